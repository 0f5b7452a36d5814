"""Self-referencing TVIEWs: how a view reads other rows of its own base table (pure, no I/O).

A tree view reads ``tb_<entity>`` more than once: the parent a row embeds
(``LEFT JOIN tb_node p ON p.pk_node = n.fk_node``), the children it aggregates
(``(SELECT count(*) FROM tb_node c WHERE c.fk_node = n.pk_node)``), the ancestors or descendants
a ``WITH RECURSIVE`` walks.  :func:`self_reference` finds out, from the SELECT (nested views
expanded from their definitions), which rows of ``tv_<entity>`` a change of one row of
``tb_<entity>`` reaches.

The model.  Every reference to the table is an *occurrence*.  An equality of key columns of two
occurrences links them: ``a.pk = b.fk`` (a is b's parent), ``a.pk = b.pk`` (the same row),
``a.fk = b.fk`` (siblings): a constraint on the rows bound to the side it restricts (the query
level binding it; not the preserved side of an outer join).  Values are followed through
subqueries, CTEs and views; a recursive CTE to a fixpoint, so the occurrence in its recursive
term is linked to itself.  The occurrence whose pk is the TVIEW's pk is the *root*, the row
itself; tview/selfterms.py turns the constraints into terms (down, up): a change of a row
reaches the rows at most ``down`` levels below the rows at most ``up`` levels above it
(``UNBOUNDED`` for a recursion; the planner's key set, ``treekeys.SelfRule``).

What cannot be said this way -- an occurrence joined by anything else (``p.name =
n.parent_name``, an expression, a link table, no condition), two fk columns linking rows, a
window function, DISTINCT ON or LIMIT choosing rows by the others (one reference is enough for
that), a construct the walk does not follow -- is the ``problem``: the TVIEW is refreshed fully
when the table changes (strategy ``full`` with a WARNING), never left stale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, JoinType, SetOperation, SubLinkType

from tvproxy.tview.astwalk import conjuncts, deparse, expr_nodes, sublinks, walk
from tvproxy.tview.selfterms import UNBOUNDED, Constraint, terms_of

Token = tuple[int, str]  # (occurrence, column of the table); column "#": computed from it
UNKNOWN: Token = (-1, "?")  # a value the walk cannot follow
_COMPUTED = "#"
_MAX_FIXPOINT = 64


@dataclass(frozen=True)
class SelfReference:
    """How a view reads its own base table ``table``: ``occurrences`` references linked by the
    fk column ``link``; ``terms``: (down, up) levels of propagation, ``UNBOUNDED`` for a
    recursion; ``problem``: why the references cannot be mapped to keys (None: they can)."""

    table: str
    occurrences: int
    link: str | None
    terms: tuple[tuple[int, int], ...]
    problem: str | None = None

    @property
    def recursive(self) -> bool:
        return any(UNBOUNDED in term for term in self.terms)


Columns = list[tuple[str, frozenset[Token]]]


@dataclass
class _Rel:
    """A FROM item: its columns in order with the tokens their values carry (None: unknown)."""

    columns: Columns | None
    occurrence: int | None = None

    def get(self, name: str) -> frozenset[Token] | None:
        for col, tokens in self.columns or ():
            if col == name:
                return tokens
        return None


@dataclass
class _Scope:
    parent: _Scope | None
    items: dict[str, _Rel] = field(default_factory=dict)
    ctes: dict[str, _Rel] = field(default_factory=dict)

    def cte(self, name: str) -> _Rel | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return scope.ctes[name]
            scope = scope.parent
        return None


@dataclass(frozen=True)
class _Val:
    """What an expression is: the tokens of its value; ``local``: it reads an item the
    condition constrains; ``direct``: a plain column of that occurrence's own binding."""

    tokens: frozenset[Token]
    local: bool = False
    direct: int | None = None


class _Analysis:
    def __init__(self, table: str, schema: str | None, pk: str,
                 columns: Mapping[str, Sequence[str]], views: Mapping[str, str]) -> None:
        self.table, self.schema, self.pk = table, schema, pk
        self.columns, self.views = columns, views
        self.occ: dict[int, int] = {}  # id(RangeVar) -> occurrence
        self.names: list[str] = []  # alias of each occurrence
        # per condition: (link columns, constraints), None: not a link
        self.conds: dict[int, tuple[frozenset[str], tuple[Constraint, ...]] | None] = {}
        self.mentions: dict[int, set[str]] = {}  # occurrence -> conditions mentioning it
        self.view_ast: dict[int, ast.SelectStmt] = {}
        self.sub_out: dict[int, Columns | None] = {}
        self.problems: list[str] = []
        self.across: dict[int, str] = {}  # occurrence -> what reads other rows beside it
        self.stack: list[int] = []  # the SELECTs being walked (ids)
        self.bound_in: dict[int, int] = {}  # occurrence -> the SELECT whose FROM binds it
        self.cond_in: dict[int, int] = {}  # condition -> the SELECT it belongs to
        self.picky: dict[int, str] = {}  # SELECTs choosing rows by the others (LIMIT, window)

    # -- relations ---------------------------------------------------------------------------

    def is_key(self, column: str) -> bool:
        return column == self.pk or column.startswith("fk_")

    def view(self, node: ast.RangeVar) -> ast.SelectStmt | None:
        if id(node) in self.view_ast:
            return self.view_ast[id(node)]
        name = f"{node.schemaname}.{node.relname}" if node.schemaname else node.relname
        sql = self.views.get(name)
        if sql is None:
            return None
        stmt = pglast.parse_sql(sql)[0].stmt
        self.view_ast[id(node)] = stmt  # kept: the ids of its nodes are keys
        return stmt

    def range_var(self, node: ast.RangeVar, scope: _Scope) -> _Rel:
        cte = scope.cte(node.relname) if not node.schemaname else None
        if cte is not None:
            return _Rel(cte.columns)
        if node.relname == self.table and node.schemaname in (None, self.schema):
            i = self.occ.setdefault(id(node), len(self.occ))
            self.bound_in.setdefault(i, self.stack[-1])
            if i == len(self.names):
                self.names.append(node.alias.aliasname if node.alias else node.relname)
            cols = self.columns.get(self.table, ())
            return _Rel([(c, frozenset({(i, c)})) for c in cols], i)
        stmt = self.view(node)
        if stmt is not None:
            return _Rel(self.select(stmt, None))
        known = self.columns.get(node.relname)
        return _Rel([(c, frozenset()) for c in known] if known is not None else None)

    def from_item(self, node: ast.Node, scope: _Scope) -> list[str]:
        """Add a FROM item to ``scope``; returns the aliases it added."""
        if isinstance(node, ast.JoinExpr):
            return self.join(node, scope)
        alias = getattr(node, "alias", None)
        if isinstance(node, ast.RangeVar):
            rel = self.range_var(node, scope)
            name = alias.aliasname if alias else node.relname
        elif isinstance(node, ast.RangeSubselect):
            outer = scope if node.lateral else scope.parent
            rel = _Rel(self.select(node.subquery, _Scope(outer, ctes=scope.ctes)))
            name = alias.aliasname if alias else "?subquery"
        else:  # functions, XMLTABLE, ...: their arguments may hold subqueries
            for link in sublinks(node):
                self.sublink(link, scope)
            names = [d.colname for d in getattr(node, "coldeflist", None) or ()]
            rel = _Rel([(n, frozenset()) for n in names] if names else None)
            name = alias.aliasname if alias else "?function"
        if alias is not None and alias.colnames and rel.columns is not None:
            renamed = [c.sval for c in alias.colnames]
            rel.columns = [(renamed[i] if i < len(renamed) else col, tokens)
                           for i, (col, tokens) in enumerate(rel.columns)]
        scope.items[name] = rel
        return [name]

    def join(self, node: ast.JoinExpr, scope: _Scope) -> list[str]:
        left = self.from_item(node.larg, scope)
        right = self.from_item(node.rarg, scope)
        if node.isNatural and any(scope.items[n].occurrence is not None
                                  or self.carries(scope.items[n]) for n in left + right):
            self.problems.append(f"{self.table} is read in a NATURAL JOIN")
        constrained = {JoinType.JOIN_LEFT: right, JoinType.JOIN_RIGHT: left}.get(
            node.jointype, left + right)
        for col in node.usingClause or ():
            lv = self.column_in(col.sval, left, scope, constrained)
            rv = self.column_in(col.sval, right, scope, constrained)
            self.link(id(col), f"USING ({col.sval})", lv, rv)
        self.conditions(node.quals, scope, frozenset(constrained))
        if node.alias is not None:  # an aliased join hides the names inside it
            merged: Columns = []
            for n in left + right:
                merged += scope.items.pop(n).columns or []
            scope.items[node.alias.aliasname] = _Rel(merged)
            return [node.alias.aliasname]
        return left + right

    def carries(self, rel: _Rel) -> bool:
        return any(t[0] >= 0 for _, tokens in rel.columns or () for t in tokens)

    def column_in(self, name: str, aliases: list[str], scope: _Scope,
                  constrained: list[str]) -> _Val:
        for alias in aliases:
            tokens = scope.items[alias].get(name)
            if tokens is not None:
                return _Val(tokens, alias in constrained)
        return _Val(frozenset({UNKNOWN}))

    # -- SELECT ------------------------------------------------------------------------------

    def select(self, stmt: ast.Node, outer: _Scope | None) -> Columns | None:
        if not isinstance(stmt, ast.SelectStmt):
            self.problems.append(f"{self.table} is read by a {type(stmt).__name__}")
            return None
        self.stack.append(id(stmt))
        try:
            return self._select(stmt, outer)
        finally:
            self.stack.pop()

    def _select(self, stmt: ast.SelectStmt, outer: _Scope | None) -> Columns | None:
        scope = _Scope(outer)
        if stmt.withClause is not None:
            self.with_clause(stmt.withClause, scope)
        if stmt.op != SetOperation.SETOP_NONE:
            left = self.select(stmt.larg, scope)
            right = self.select(stmt.rarg, scope)
            if left is None or right is None:
                return None
            return [(name, tokens | r) for (name, tokens), (_, r) in zip(left, right,
                                                                            strict=False)]
        for row in stmt.valuesLists or ():
            for link in sublinks(row):
                self.sublink(link, scope)
        for item in stmt.fromClause or ():
            self.from_item(item, scope)
        self.conditions(stmt.whereClause, scope, None)
        self.conditions(stmt.havingClause, scope, None)
        for clause in (stmt.groupClause, stmt.sortClause, stmt.windowClause,
                       stmt.distinctClause, stmt.limitCount, stmt.limitOffset):
            for node in clause if isinstance(clause, tuple) else (clause,):
                for link in sublinks(node):
                    self.sublink(link, scope)
        out = self.targets(stmt, scope)
        across = _across_rows(stmt)
        if across:
            self.picky[id(stmt)] = across
        for _, tokens in out or ():
            for i, col in tokens:
                if across and col == self.pk:
                    self.across.setdefault(i, across)
        return out

    def targets(self, stmt: ast.SelectStmt, scope: _Scope) -> Columns | None:
        out: Columns = []
        for target in stmt.targetList or ():
            val = target.val
            for link in sublinks(val):
                self.sublink(link, scope)
            if isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.A_Star):
                star = self.star(val, scope)
                if star is None:
                    return None
                out += star
                continue
            out.append((target.name or _default_name(val), self.value(val, scope).tokens))
        return out

    def star(self, ref: ast.ColumnRef, scope: _Scope) -> Columns | None:
        names = [f.sval for f in ref.fields if isinstance(f, ast.String)]
        rels = [scope.items.get(names[-1])] if names else list(scope.items.values())
        out: Columns = []
        for rel in rels:
            if rel is None or rel.columns is None:
                return None
            out += rel.columns
        return out

    def with_clause(self, clause: ast.WithClause, scope: _Scope) -> None:
        for cte in clause.ctes:
            names = [c.sval for c in cte.aliascolnames or ()]
            query = cte.ctequery
            rel = _Rel([])
            recursive = (clause.recursive and isinstance(query, ast.SelectStmt)
                         and query.op == SetOperation.SETOP_UNION)
            if not recursive:
                rel.columns = _renamed(self.select(query, scope), names)
                scope.ctes[cte.ctename] = rel
                continue
            scope.ctes[cte.ctename] = rel
            rel.columns = _renamed(self.select(query.larg, scope), names)
            for _ in range(_MAX_FIXPOINT):
                step = _renamed(self.select(query.rarg, scope), names)
                grown = _union(rel.columns, step)
                if grown == rel.columns:
                    break
                rel.columns = grown
            else:
                self.problems.append(f"the recursion of {cte.ctename} cannot be followed")

    def sublink(self, link: ast.SubLink, scope: _Scope) -> Columns | None:
        out = self.select(link.subselect, scope)
        self.sub_out[id(link)] = out
        return out

    # -- values and conditions ---------------------------------------------------------------

    def resolve(self, ref: ast.ColumnRef, scope: _Scope,
                constrained: frozenset[str] | None) -> _Val:
        names = [f.sval for f in ref.fields if isinstance(f, ast.String)]
        if len(names) != len(ref.fields) or not names:
            return _Val(frozenset({UNKNOWN}))
        col, qual = names[-1], names[-2] if len(names) > 1 else None
        level: _Scope | None = scope
        first = True
        while level is not None:
            found = self.lookup(level, qual, col)
            if found is not None:
                alias, rel, tokens = found
                local = first and (constrained is None or alias in constrained)
                if tokens is None:  # an alias as a whole-row value
                    whole = frozenset((t[0], _COMPUTED) for _, ts in rel.columns or ()
                                      for t in ts) if rel.columns is not None else frozenset(
                        {UNKNOWN})
                    return _Val(whole, local)
                return _Val(tokens, local, rel.occurrence)
            level, first = level.parent, False
        return _Val(frozenset({UNKNOWN}))

    def lookup(self, scope: _Scope, qual: str | None, col: str
               ) -> tuple[str, _Rel, frozenset[Token] | None] | None:
        if qual is not None:
            rel = scope.items.get(qual)
            if rel is None:
                return None
            tokens = rel.get(col)
            return qual, rel, tokens if tokens is not None else frozenset({UNKNOWN})
        hits = [(a, r, r.get(col)) for a, r in scope.items.items()]
        known = [(a, r, t) for a, r, t in hits if t is not None]
        if any(r.columns is None for _, r, _ in hits):
            return (known[0][0], known[0][1], frozenset({UNKNOWN})) if known else (
                "?", _Rel(None), frozenset({UNKNOWN}))
        if len(known) == 1:
            return known[0]
        if not known and col in scope.items:
            return col, scope.items[col], None  # whole row
        return ("?", _Rel(None), frozenset({UNKNOWN})) if known else None

    def value(self, node: ast.Node, scope: _Scope,
              constrained: frozenset[str] | None = None) -> _Val:
        if isinstance(node, ast.TypeCast):
            return self.value(node.arg, scope, constrained)
        if isinstance(node, ast.ColumnRef):
            return self.resolve(node, scope, constrained)
        tokens: set[Token] = set()
        local = False
        for n in expr_nodes(node):
            if isinstance(n, ast.ColumnRef):
                v = self.resolve(n, scope, constrained)
                tokens |= {t if t == UNKNOWN else (t[0], _COMPUTED) for t in v.tokens}
                local = local or v.local
            elif isinstance(n, ast.SubLink):
                out = self.sub_out.get(id(n)) or []
                tokens |= {t if t == UNKNOWN else (t[0], _COMPUTED) for _, ts in out
                           for t in ts}
        return _Val(frozenset(tokens), local)

    def conditions(self, expr: ast.Node | None, scope: _Scope,
                   constrained: frozenset[str] | None) -> None:
        for cond in conjuncts(expr):
            for link in sublinks(cond):
                self.sublink(link, scope)
            if (isinstance(cond, ast.A_Expr) and cond.kind == A_Expr_Kind.AEXPR_OP
                    and cond.name[-1].sval == "="):
                self.link(id(cond), deparse(cond), self.value(cond.lexpr, scope, constrained),
                          self.value(cond.rexpr, scope, constrained))
            elif (isinstance(cond, ast.SubLink) and cond.subLinkType == SubLinkType.ANY_SUBLINK
                  and (not cond.operName or cond.operName[-1].sval == "=")):
                out = self.sub_out.get(id(cond)) or [("?", frozenset({UNKNOWN}))]
                self.link(id(cond), deparse(cond), self.value(cond.testexpr, scope, constrained),
                          _Val(out[0][1], True) if len(out) == 1 else _Val(frozenset({UNKNOWN})))
            else:
                self.mention(id(cond), deparse(cond), self.value(cond, scope, constrained))

    def mention(self, key: int, text: str, *vals: _Val) -> None:
        self.cond_in[key] = self.stack[-1]
        for v in vals:
            for i, _ in v.tokens:
                if i >= 0:
                    self.mentions.setdefault(i, set()).add(text)
        self.conds.setdefault(key, None)

    def link(self, key: int, text: str, left: _Val, right: _Val) -> None:
        """An equality.  Where one side is a key column of one occurrence that the condition
        constrains, every row bound to that occurrence is the same row, the parent, a child or
        a sibling of a row of the other side: a constraint."""
        self.mention(key, text, left, right)
        self.conds[key] = None
        if not (left.tokens and right.tokens and all(
                t[0] >= 0 and self.is_key(t[1]) for t in left.tokens | right.tokens)):
            return
        if left.direct is not None and left.direct == right.direct:
            return  # a condition on one row, not a link
        found: list[Constraint] = []
        links: set[str] = set()
        for this, other in ((left, right), (right, left)):
            if not this.local or len(this.tokens) != 1:
                continue
            (i, a), = this.tokens
            alts = []
            for j, b in other.tokens:
                step = self.step(a, b)
                if step is None:
                    return
                alts.append((j, step))
                links |= {c for c in (a, b) if c != self.pk}
            if (i, "") not in alts:
                found.append((i, tuple(alts), False))
        if len(found) == 2:  # each side bound given the other: one says what the other does
            found = [(i, alts, True) for i, alts, _ in found]
        self.conds[key] = (frozenset(links), tuple(found))

    def step(self, a: str, b: str) -> str | None:
        """From a row of the other side (column ``b``) to the constrained one (column ``a``)."""
        if a == self.pk:
            return "" if b == self.pk else "U"  # the same row, or the other one's parent
        if b == self.pk:
            return "D"  # a child of the other one
        return "UD" if a == b else None  # siblings

    # -- the result --------------------------------------------------------------------------

    def count(self, node: ast.Node, seen: frozenset[str] = frozenset()) -> int:
        """References to the table anywhere in ``node``, through the views it reads."""
        n = 0
        for sub in walk(node):
            if not isinstance(sub, ast.RangeVar):
                continue
            if sub.relname == self.table and sub.schemaname in (None, self.schema):
                n += 1
                continue
            name = f"{sub.schemaname}.{sub.relname}" if sub.schemaname else sub.relname
            if name in self.views and name not in seen:
                n += self.count(pglast.parse_sql(self.views[name])[0].stmt, seen | {name})
        return n


def _across_rows(stmt: ast.SelectStmt) -> str | None:
    """What makes a row of this SELECT depend on the other rows it reads beside it."""
    if stmt.windowClause or any(isinstance(n, ast.FuncCall) and n.over is not None
                                for t in (*(stmt.targetList or ()), *(stmt.sortClause or ()))
                                for n in expr_nodes(t)):
        return "a window function"
    if stmt.distinctClause and stmt.distinctClause != (None,):
        return "DISTINCT ON"
    if stmt.limitCount is not None or stmt.limitOffset is not None:
        return "LIMIT/OFFSET"
    return None


def _default_name(node: ast.Node) -> str:
    if isinstance(node, ast.TypeCast):
        return _default_name(node.arg)
    if isinstance(node, ast.ColumnRef) and isinstance(node.fields[-1], ast.String):
        return str(node.fields[-1].sval)
    if isinstance(node, ast.FuncCall):
        return str(node.funcname[-1].sval)
    return "?column?"


def _renamed(columns: Columns | None, names: list[str]) -> Columns | None:
    if columns is None:
        return None
    return [(names[i] if i < len(names) else col, tokens)
            for i, (col, tokens) in enumerate(columns)]


def _union(a: Columns | None, b: Columns | None) -> Columns | None:
    if a is None or b is None:
        return None
    return [(name, tokens | other) for (name, tokens), (_, other) in zip(a, b, strict=False)]


def self_reference(select_sql: str, table: str, pk: str, out_pk: str,
                   columns: Mapping[str, Sequence[str]], views: Mapping[str, str] | None = None,
                   schema: str | None = None) -> SelfReference | None:
    """How the SELECT of a TVIEW reads ``table`` (its own base table, primary key ``pk``;
    ``out_pk`` is the TVIEW's pk column).  None when it reads the table once or not at all.

    ``columns``: the columns of every base table the view reads; ``views``: the definitions of
    the views it reads (by name and by ``schema.name``), expanded where they are referenced.
    """
    a = _Analysis(table, schema, pk, columns, views or {})
    try:
        stmt = pglast.parse_sql(select_sql)[0].stmt
        total = a.count(stmt)
    except pglast.parser.ParseError as exc:
        return SelfReference(table, 0, None, (), f"cannot parse a view it reads ({exc})")
    if total == 0:
        return None
    out = a.select(stmt, None)
    if total == 1:  # the row itself, unless something reads the rows beside it
        roots = {t[0] for t in dict(out or ()).get(out_pk, ()) if t[0] >= 0}
        how = next((a.across[r] for r in sorted(roots) if r in a.across), None)
        return None if how is None else SelfReference(
            table, 1, None, (), f"{table} is read with {how} over its other rows")
    return _result(a, out, total, out_pk)


def _result(a: _Analysis, out: Columns | None, total: int, out_pk: str) -> SelfReference:
    n = len(a.names)

    def refuse(problem: str) -> SelfReference:
        return SelfReference(a.table, max(n, total), None, (), problem)

    if a.problems:
        return refuse(a.problems[0])
    if n != total:
        return refuse(f"{a.table} is read {total} times, {n} of them where the proxy can "
                      f"follow the rows read")
    pk_tokens = dict(out or ()).get(out_pk, frozenset())
    if not pk_tokens or any(t[0] < 0 or t[1] != a.pk for t in pk_tokens):
        return refuse(f"cannot tell which reference to {a.table} gives {out_pk}")
    found = [c for c in a.conds.values() if c is not None]
    links = sorted({col for cols, _ in found for col in cols})
    # where a SELECT picks its rows by the others (LIMIT, a window), only its own conditions
    # say which rows of it are read
    constraints = [c for key, cond in a.conds.items() if cond is not None for c in cond[1]
                   if a.bound_in.get(c[0]) not in a.picky or a.cond_in.get(key) == a.bound_in[c[0]]]
    if len(links) > 1:
        return refuse(f"rows of {a.table} are linked by more than one column "
                      f"({', '.join(links)})")
    how = next((a.across[r] for r in sorted(t[0] for t in pk_tokens) if r in a.across), None)
    if how is not None:
        return refuse(f"{a.table} is read with {how} over its other rows")
    reached, terms = terms_of({t[0] for t in pk_tokens}, constraints, n)
    for i in range(n):
        if i not in reached:
            how = " AND ".join(sorted(a.mentions.get(i, ()))) or "no condition"
            name = a.table if a.names[i] == a.table else f"{a.table} {a.names[i]}"
            picky = a.picky.get(a.bound_in.get(i, -1))
            if picky is not None:
                return refuse(f"{name} is read with {picky} before {how} says which rows")
            return refuse(f"{name} is joined to the row by {how}, not by an equality of "
                          f"{a.pk} with an fk_ column of {a.table}")
    return SelfReference(a.table, n, links[0] if links else None, terms)
