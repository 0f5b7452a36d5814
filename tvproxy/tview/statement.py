"""One analysis of a statement text: everything the engine needs to know about it (pure, no I/O).

:class:`Analyzer` (one per catalog: a new catalog gets a new analyzer and so new caches) turns a
text into one immutable :class:`Statement`: its kind (transaction control with kind and name,
tracked writes, opaque writer, read of a ``tv_`` table, DDL after which the catalog must be
reloaded, or nothing), the tracked tables it writes and, per write, its keys or where to find
them (literal values read from this very text, ``$n`` parameters to read at Bind, or ``None``:
only an appended RETURNING can tell).

Cost, cheapest first:

1. A text seen before without literals (prepared statements, ``BEGIN``, ``COMMIT``): one dict
   lookup.
2. A text that cannot write a tracked table nor control the transaction (first keyword of each
   statement + table-name substrings, on one lowercased copy): a few substring tests, never
   pglast.  Reads of ``tv_`` tables, opaque writers and DDL are told from the same tests.
3. Otherwise the text is normalised (``pglast.parser.normalize``: literals become ``$n``, in C,
   without building a Python syntax tree); texts that differ only in their literal values share
   one entry, and the keys are read from the literals of the actual text (their spans are
   found by the shape's pattern, one regular expression made from its first text, or by
   aligning the text with its normalised form when the pattern does not apply).
4. Only the first text of a shape is parsed with pglast (the normalised text is parsed, so a
   literal key shows up as a placeholder parameter, i.e. as a position to read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import pglast
from pglast import ast
from pglast.parser import ParseError, normalize

from tvproxy.tview.capture import KeyRef, TrackedTable, WriteCapture, capture_statement
from tvproxy.tview.opaque import is_opaque
from tvproxy.tview.txcontrol import TxCommand, TxKind, tx_command

# the first word of every statement of a text (a ';' inside a literal only adds candidates)
_LEAD = r"(?:^|;)\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*"
_FIRST_WORDS = re.compile(_LEAD + r"([a-z]+)", re.DOTALL)
_TX_WORDS = frozenset({"begin", "start", "commit", "end", "rollback", "abort", "savepoint",
                       "release", "prepare"})
_WRITE_WORDS = frozenset({"insert", "update", "delete", "merge", "with", "copy", "truncate"})
_DDL_WORDS = frozenset({"create", "alter", "drop"})
# DDL after which the audit's catalog may be out of date (triggers, functions, foreign keys)
_DDL = re.compile(_LEAD + r"(?:create|alter|drop)\s+(?:or\s+replace\s+)?(?:constraint\s+)?"
                  r"(?:function|procedure|trigger|table)\b", re.IGNORECASE | re.DOTALL)

# --- literals: spans in the text, and their values -------------------------------------------

_DIGITS = re.compile(r"\d+")
_LITERAL = re.compile(
    r"""-?\s*(?:0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)"""
    r"""|'(?:[^']|'')*'(?:[ \t\r\f]*\n\s*'(?:[^']|'')*')*"""
    r"""|[eE]'(?:[^'\\]|\\.|'')*'"""
    r"""|[uU]&'(?:[^']|'')*'"""
    r"""|[bBxXnN]'[^']*'"""
    r"""|\$(?P<tag>(?:[A-Za-z_\x80-\uffff][\w\x80-\uffff]*)?)\$.*?\$(?P=tag)\$"""
    r"""|(?:true|false|null)\b""",
    re.IGNORECASE | re.DOTALL)
_INTEGER = re.compile(r"-?\s*\d+")
_PLAIN_STRING = re.compile(r"'(?:[^']|'')*'")
_FRACTION = re.compile(r"-?\s*(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|true|false|null",
                       re.IGNORECASE)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNSURE = _Marker("UNSURE")  # a literal this module does not decode itself (pglast does)
NOT_A_KEY = _Marker("NOT_A_KEY")  # NULL, booleans, fractions: never a key, as for pglast


def literal_value(text: str) -> int | str | _Marker:
    """The value of one literal as capture reads it from pglast: integers as int, plain
    strings as str (standard_conforming_strings on); NOT_A_KEY for NULL/booleans/fractions;
    UNSURE for every other form (E'', U&'', $$, hex, with '_' ...)."""
    if _INTEGER.fullmatch(text):
        return int("".join(text.split()))
    if _PLAIN_STRING.fullmatch(text):
        return text[1:-1].replace("''", "'")
    if _FRACTION.fullmatch(text):
        return NOT_A_KEY
    return UNSURE


def literal_spans(sql: str, shape: str) -> list[tuple[int, int, int]] | None:
    """Where the literals of ``sql`` are, from its normalised text ``shape`` (the text with
    each literal replaced by ``$k``, everything else kept): ``(start, end, k)`` in text order,
    or None when the two do not align (then the caller parses ``sql`` itself)."""
    out: list[tuple[int, int, int]] = []
    i = j = 0
    while True:
        k = shape.find("$", j)
        if k < 0:
            return out if len(sql) - i == len(shape) - j and sql.startswith(shape[j:], i) \
                else None
        if not sql.startswith(shape[j:k], i):
            return None
        i += k - j
        m = _DIGITS.match(shape, k + 1)
        if m is None:  # a '$' of the text itself (inside an identifier or kept literal)
            if not sql.startswith("$", i):
                return None
            i += 1
            j = k + 1
            continue
        j = m.end()
        if sql.startswith(shape[k:j], i) and not sql[i + j - k:i + j - k + 1].isdigit():
            i += j - k  # a parameter, or text in a comment: the same in both
            continue
        lit = _LITERAL.match(sql, i)  # no literal starts with '$<digit>': this is one
        if lit is None:
            return None
        out.append((i, lit.end(), int(m.group())))
        i = lit.end()


# --- the result ------------------------------------------------------------------------------


class Kind:
    """Bits of :attr:`Statement.kind` (plain ints: tested on every statement, where an
    ``IntFlag``'s ``&`` would cost a Python call)."""

    NOTHING = 0
    TX = 1  # transaction control (BEGIN, COMMIT, SAVEPOINT, PREPARE TRANSACTION, ...)
    WRITE = 2  # writes a tracked table
    OPAQUE = 4  # may write tracked tables in ways the text does not show (audited)
    READS_TV = 8  # names a tv_ table (read-your-writes flushes before it)
    RELOAD = 16  # DDL after which the catalog's functions/triggers/keys must be reloaded


@dataclass(frozen=True, slots=True)
class Statement:
    """What a statement text does, for the engine (immutable, shared between texts)."""

    kind: int  # Kind bits
    # per statement of the text: its transaction command or None; () when it does not parse
    commands: tuple[TxCommand | None, ...] = (None,)
    writes: tuple[WriteCapture, ...] = ()

    @property
    def tx(self) -> tuple[TxCommand, ...]:
        return tuple(c for c in self.commands if c is not None)

    @property
    def tables(self) -> frozenset[str]:
        return frozenset(w.table for w in self.writes)

    @property
    def opaque(self) -> bool:
        return bool(self.kind & Kind.OPAQUE)

    @property
    def reads_tv(self) -> bool:
        return bool(self.kind & Kind.READS_TV)

    @property
    def reload(self) -> bool:
        return bool(self.kind & Kind.RELOAD)

    @property
    def ends_transaction(self) -> bool:
        """COMMIT/END/COMMIT AND CHAIN/PREPARE TRANSACTION among its statements."""
        return any(c is not None and c.kind in _COMMITS for c in self.commands)


_COMMITS = (TxKind.COMMIT, TxKind.COMMIT_AND_CHAIN, TxKind.PREPARE)
NOTHING = Statement(Kind.NOTHING)


class CatalogFacts(Protocol):
    """What the analysis reads from the catalog (tview/model.py's RuntimeCatalog)."""

    tracked: tuple[TrackedTable, ...]
    table_names: frozenset[str]
    tv_tables: Mapping[str, str]
    functions: re.Pattern[str] | None
    trigger_tables: frozenset[str]
    audited: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Shape:
    """The analysis of one normalised text: its Statement with literal keys as slots."""

    statement: Statement
    # (write index, key index, placeholder number) of each key that is a literal
    slots: tuple[tuple[int, int, int], ...]
    placeholders: frozenset[int]  # numbers of the normalised text standing for literals
    # the texts of this shape as a regular expression, one group per literal (the text around
    # them is the first text's own), with the placeholder number of each group; None when a
    # literal of the first text is not a plain integer or string (then literal_spans aligns)
    pattern: re.Pattern[str] | None = None
    numbers: tuple[int, ...] = ()

    def spans(self, sql: str, shape: str) -> list[tuple[int, int, int]] | None:
        """Where the literals of ``sql`` (a text of this shape) are, as literal_spans."""
        if self.pattern is not None:
            m = self.pattern.fullmatch(sql)
            if m is not None:
                return [(m.start(g), m.end(g), k) for g, k in enumerate(self.numbers, 1)]
        return literal_spans(sql, shape)

    def match(self, sql: str) -> Statement | None:
        """The Statement of ``sql`` if its pattern matches it: the fixed text around the
        literals is the first text's own and each literal is cut where the lexer cuts it, so
        the text normalises to this shape (None: not this shape, or a literal to parse)."""
        if self.pattern is None:
            return None
        m = self.pattern.fullmatch(sql)
        if m is None:
            return None
        return _instantiate(self, sql, [(m.start(g), m.end(g), k)
                                        for g, k in enumerate(self.numbers, 1)])


# the literal forms a shape's pattern matches, with what may not stand around them (so that
# the pattern cuts a text exactly where PostgreSQL's lexer does): an integer not next to a
# word character, '.' or '$'; a plain string not preceded by a word character, '&' or '$'
# (E'', U&'', B'', $$ quoting) and not continued on a next line ('a'\n'b' is one literal)
_INT_SLOT = r"(\d+)(?![\w.$])"
_STR_SLOT = r"('(?:[^']|'')*')(?![ \t\r\f]*\n\s*')"
_WORD_BEFORE = re.compile(r"[\w&$'\-/*]\Z")
# a text with its strings and digits blanked: where the shapes a text may have are looked up
# before normalising it (texts differing only in literals share it; each shape's pattern then
# decides)
_ROUGH = re.compile(r"'(?:[^']|'')*'|\d+")
MAX_ROUGH = 4  # shapes kept per rough text


def _pattern(sql: str, spans: list[tuple[int, int, int]]) -> re.Pattern[str] | None:
    """The texts sharing the shape of ``sql`` (literals at ``spans``) as one expression, or
    None when a literal is not a plain integer or string, or sits where the pattern could
    cut another text differently (next to a word, an operator character or a quote)."""
    parts = []
    at = 0
    for start, end, _k in spans:
        lit = sql[start:end]
        before = sql[at:start]
        if _WORD_BEFORE.search(before) or (not before and start > 0):
            return None
        if lit.isdigit() and lit.isascii():
            slot = _INT_SLOT
        elif _PLAIN_STRING.fullmatch(lit):
            slot = _STR_SLOT
        else:
            return None
        parts += [re.escape(before), slot]
        at = end
    parts.append(re.escape(sql[at:]))
    pattern = re.compile("".join(parts), re.DOTALL)
    m = pattern.fullmatch(sql)
    if m is None or [(m.start(g), m.end(g)) for g in range(1, len(spans) + 1)] != [
            (s, e) for s, e, _k in spans]:
        return None
    return pattern


MAX_ENTRIES = 4096


class Analyzer:
    """The analysis of statement texts against one catalog, cached."""

    def __init__(self, cat: CatalogFacts) -> None:
        self.catalog = cat
        self.tables = {t.name: t for t in cat.tracked}
        self.table_names = tuple(cat.table_names)
        self.tv_tables = tuple(cat.tv_tables)
        self.functions = cat.functions if cat.audited else None
        self.trigger_tables = tuple(cat.trigger_tables) if cat.audited else ()
        self.audited = bool(cat.audited)
        self._exact: dict[str, Statement] = {}  # texts without literals, and odd ones
        self._shapes: dict[str, _Shape | None] = {}  # None: its texts are parsed one by one
        self._direct: dict[Kind, Statement] = {}
        self._rough: dict[str, tuple[_Shape, ...]] = {}  # see _ROUGH
        # texts whose literals hold no key (a parameterised statement with a constant in it,
        # as drivers send them at every Parse): their Statement, without normalising again
        self._fixed: dict[str, Statement] = {}
        # the shape a text last matched: statements of one shape come in runs (a loop, a
        # transaction writing the same row again), tried before the rough lookup
        self._last: _Shape | None = None
        self.parses = 0  # pglast parses so far (for tests and measurements)
        self.normalized = 0  # texts normalised so far (for tests and measurements)

    def analyze(self, sql: str) -> Statement:
        hit = self._exact.get(sql)
        if hit is None:
            hit = self._fixed.get(sql)
        if hit is not None:
            return hit
        last = self._last
        if last is not None:
            st = last.match(sql)
            if st is not None:
                return st
        rough = _ROUGH.sub("?", sql)
        for entry in self._rough.get(rough, ()):
            st = entry.match(sql)
            if st is not None:
                self._last = entry
                return st
        low = sql.lower()
        kind = self._candidates(sql, low)
        if not kind & (Kind.TX | Kind.WRITE):  # nothing pglast could add: done
            if not kind:
                return NOTHING
            st = self._direct.get(kind)
            if st is None:
                st = self._direct[kind] = Statement(kind)
            return st
        self.normalized += 1
        try:
            shape = normalize(sql)
        except ParseError:
            return self._parse_exact(sql)
        entry = self._shapes.get(shape, _MISSING)
        spans = None
        if entry is _MISSING:
            spans = literal_spans(sql, shape)
            entry = self._shape(shape, sql, spans) if spans is not None else None
            if shape != sql or entry is None:
                # a text without literals (its $n are parameters) says nothing of where the
                # literals of the texts sharing its shape are: only it is cached (below)
                _put(self._shapes, shape, entry)
        if entry is None:
            return self._parse_exact(sql)
        assert isinstance(entry, _Shape)
        if shape == sql:
            _put(self._exact, sql, entry.statement)
            return entry.statement
        if not entry.slots:
            _put(self._fixed, sql, entry.statement)
            return entry.statement
        if spans is None:
            spans = entry.spans(sql, shape)
            if spans is None:
                return self._parse_exact(sql)
        st = _instantiate(entry, sql, spans)
        if st is None:
            return self._parse_exact(sql)
        if entry.pattern is not None:  # the next texts of this shape skip normalize
            known = self._rough.get(rough, ())
            if not any(e is entry for e in known):
                _put(self._rough, rough, (entry, *known[:MAX_ROUGH - 1]))
            self._last = entry
        return st

    # --- the cheap tests ------------------------------------------------------------------

    def _candidates(self, sql: str, low: str) -> int:
        """What the text may be, from first keywords and substrings (a superset)."""
        if ";" in low and ";" in low.rstrip().rstrip(";"):  # not only a closing ';'
            words = set(_FIRST_WORDS.findall(low))
        else:
            m = _FIRST_WORDS.match(low)
            words = {m.group(1)} if m is not None else set()
        kind = Kind.NOTHING
        if not words.isdisjoint(_TX_WORDS):
            kind |= Kind.TX
        writes = not words.isdisjoint(_WRITE_WORDS)
        if writes and any(t in low for t in self.table_names):
            kind |= Kind.WRITE
        if self.audited and (
                not words.isdisjoint(("call", "do", "execute", "truncate"))
                or (self.functions is not None and self.functions.search(sql) is not None)
                or (writes and any(t in low for t in self.trigger_tables))):
            kind |= Kind.OPAQUE
        if any(t in low for t in self.tv_tables):
            kind |= Kind.READS_TV
        if not words.isdisjoint(_DDL_WORDS) and _DDL.search(low):
            kind |= Kind.RELOAD
        return kind

    # --- parsing --------------------------------------------------------------------------

    def _flags(self, text: str) -> int:
        """The flags read from a text (the normalised one: literals do not count)."""
        low = text.lower()
        kind = Kind.NOTHING
        if self.audited and is_opaque(text, self.functions, frozenset(self.trigger_tables)):
            kind |= Kind.OPAQUE
        if any(t in low for t in self.tv_tables):
            kind |= Kind.READS_TV
        if _DDL.search(text):
            kind |= Kind.RELOAD
        return kind

    def _statement(self, stmts: tuple[ast.RawStmt, ...] | list[ast.RawStmt],
                   flags: int) -> Statement:
        commands: list[TxCommand | None] = []
        writes: list[WriteCapture] = []
        for raw in stmts:
            node = raw.stmt
            commands.append(tx_command(node) if isinstance(node, ast.TransactionStmt) else None)
            capture_statement(node, self.tables, writes)
        kind = flags
        if any(c is not None for c in commands):
            kind |= Kind.TX
        if writes:
            kind |= Kind.WRITE
        return Statement(kind, tuple(commands), tuple(writes))

    def _shape(self, shape: str, sql: str, spans: list[tuple[int, int, int]]) -> _Shape | None:
        """Parse a normalised text once for all the texts that share it (``sql``, the first of
        them, with its literals at ``spans``, telling which ``$n`` stand for literals)."""
        self.parses += 1
        try:
            stmts = pglast.parse_sql(shape)
        except ParseError:  # literals where the grammar wants no parameter (DO, COPY 'file')
            return None
        st = self._statement(stmts, self._flags(shape))
        if any(c.name is not None and c.name not in shape for c in st.tx):
            return None  # a name taken from a literal: not shared
        placeholders = frozenset(k for _s, _e, k in spans)
        slots = []
        for wi, w in enumerate(st.writes):
            for ki, ref in enumerate(w.keys or ()):
                if ref.param is not None and ref.param in placeholders:
                    slots.append((wi, ki, ref.param))
        pattern = _pattern(sql, spans) if slots and shape != sql else None
        return _Shape(st, tuple(slots), placeholders, pattern, tuple(k for _s, _e, k in spans))

    def _parse_exact(self, sql: str) -> Statement:
        """A text analysed on its own (cached by its text)."""
        hit = self._exact.get(sql)
        if hit is not None:
            return hit
        self.parses += 1
        try:
            st = self._statement(pglast.parse_sql(sql), self._flags(sql))
        except ParseError:  # PostgreSQL rejects it too; only the regex tests apply
            st = Statement(self._flags(sql), (), ())
        _put(self._exact, sql, st)
        return st


_MISSING = object()


def _put(cache: dict, key: str, value: object) -> None:
    if len(cache) >= MAX_ENTRIES:
        del cache[next(iter(cache))]  # the oldest entry
    cache[key] = value


def _instantiate(entry: _Shape, sql: str, spans: list[tuple[int, int, int]]) -> Statement | None:
    """The shape's Statement with the literal keys of this text (None: a literal this module
    cannot read; the caller parses the text)."""
    by_number = {k: (s, e) for s, e, k in spans}
    if by_number.keys() != entry.placeholders:
        return None
    writes = list(entry.statement.writes)
    unknown: set[int] = set()
    keys: dict[int, list[KeyRef]] = {}
    for wi, ki, number in entry.slots:
        span = by_number.get(number)
        if span is None:
            return None
        refs = keys.get(wi)
        if refs is None:
            refs = keys[wi] = list(writes[wi].keys or ())
        value = literal_value(sql[span[0]:span[1]])
        if value is UNSURE:
            return None
        if value is NOT_A_KEY or refs[ki].array:
            unknown.add(wi)  # as pglast reads it: no key, so the keys are not known
            continue
        refs[ki] = KeyRef(value=value)  # type: ignore[arg-type]
    for wi, refs in keys.items():
        writes[wi] = writes[wi].with_keys(None if wi in unknown else tuple(refs))
    return Statement(entry.statement.kind, entry.statement.commands, tuple(writes))
