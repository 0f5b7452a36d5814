"""Touched keys -> the ordered refresh SQL of one transaction (pure, no I/O).

A plan is a short list of statements sent in one round trip before the COMMIT.  Each returns
one row.  Keys are bound as array parameters; the statements of one *shape* (which entities
have named keys, which are refreshed fully) are always the same text, so the proxy prepares
them once per server and PostgreSQL runs them from a generic plan.  Each array is read through
a scalar subquery, ``(SELECT $n::type[])``: a custom plan then cannot see the values either (the
planner estimates ``unnest`` of a constant array by its length, of anything else by default),
so custom and generic plans cost the same and PostgreSQL settles on the generic one after its
five custom plans, whatever the client's ``plan_cache_mode`` default (without it, a custom plan
looked cheaper and was made again at every Bind).

1. *gate*: transaction-scoped advisory locks, in one global order (entity rank, key hash):
   exclusive on every TVIEW key the transaction rewrites that is known before anything is read
   (the keys it names, parents of aggregated children it wrote), shared on the parents those
   rows read (their new state, transitively; in a self-referencing TVIEW, the ancestors whose
   rows below they read: ``SelfRule.reads_up``).  A row that keeps its parent would not need
   that lock for freshness (whoever rewrites the parent finds it among the children in the
   expand statement), but it keeps the order deadlock-free: whoever holds a row holds its
   parents first, so a parent's rewriter never waits in its expand for a row whose holder waits
   for it.  Two transactions wait for each other only
   where one rewrites a row the other rewrites or reads: two inserts of children under one
   parent do not wait, a rename of the parent and an insert under it do.  Left out when no
   locked row reads or is read by another TVIEW (a TVIEW fed only by its own base rows, which
   the transaction holds row locks on already).  First of all, a lock per TVIEW of the plan:
   shared, or exclusive for a TVIEW refreshed whole (every key, an opaque write): that one is
   never locked row by row (PostgreSQL's lock table would not hold a lock per row of a big
   table), and it waits for, and holds off, every transaction refreshing rows of it.  With one
   key per TVIEW (the common OLTP commit) the gate is one target list of lock calls, its
   parents read by fk in scalar subqueries: no CTE, sort or aggregate to start.
2. *expand*: exclusive locks on the rows that embed a rewritten parent (``tv_e`` rows whose
   ``fk_`` column names it, transitively; in a self-referencing TVIEW, the rows of it the keys
   reach through its own fk), computed after the gate, so a parent's children are found once
   whoever inserts under it has committed.  Only when some parent is embedded.
3. *refresh*: one statement per TVIEW, dependencies first: its key set (named keys, the
   current parents of aggregated children, the rows embedding a refreshed parent, then in a
   self-referencing TVIEW the rows those reach through its own fk: ``SelfRule``), the
   recomputed ``v_e`` rows for those keys, upserts of rows that changed (``IS DISTINCT FROM``),
   deletes of rows that vanished.  Its snapshot is taken after every lock was granted, so under
   READ COMMITTED it sees everything committed before.

Under REPEATABLE READ and SERIALIZABLE the snapshot predates the locks: the later of two
transactions that meet on a row fails with 40001 (PostgreSQL's rule for concurrent updates) and
its client retries.  On a rewritten row the refresh's own upsert or delete raises it (ON
CONFLICT DO UPDATE of a row version the snapshot does not see); the gate gives the tv_ rows it
locks shared a no-op UPDATE, so that a rewriter of one whose snapshot is older fails in turn:
through the catalog's ``touch_row`` function, called only then and in (rank, key) order (two
readers of the same parents meet in the same order), or, in a catalog older than it, as
UPDATE CTEs (which PostgreSQL starts under READ COMMITTED too).

Identifiers are quoted here; key values are always bound parameters (arrays).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from tvproxy.tview.analyze import TviewError
from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.selfterms import UNBOUNDED
from tvproxy.tview.treekeys import SelfRule, self_keys, walk_keys


@dataclass(frozen=True)
class TviewSpec:
    entity: str
    table: str
    view: str
    pk: str
    pk_type: str
    columns: tuple[str, ...]  # the view's output columns, in order (pk first among pk_*)
    embeds: tuple[tuple[str, str], ...] = ()  # (fk column of tv_e, parent entity)
    schema: str = "public"
    tree: SelfRule | None = None  # it reads other rows of its own base table
    touch: str | None = None  # the catalog's no-op UPDATE of one tv_ row (catalog.ensure_touch)


@dataclass(frozen=True)
class RefreshPlan:
    entities: tuple[str, ...]  # refreshed TVIEWs, in order
    statements: tuple[str, ...]  # [gate], [expand], one per TVIEW
    params: tuple[tuple[object, ...], ...]  # bound parameters of each statement
    first_refresh: int = 0  # index of the first per-TVIEW refresh statement
    names: tuple[bytes, ...] = ()  # prepared-statement name of each statement (by digest)
    full: tuple[str, ...] = ()  # entities refreshed fully (every key, or opaque conditions)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def statement_name(sql: str) -> bytes:
    return b"tvproxy_" + hashlib.sha1(sql.encode()).hexdigest()[:20].encode()


def affected(specs: Mapping[str, TviewSpec], touched: Collection[str],
             max_depth: int = 100) -> dict[str, int]:
    """TVIEW entities a change of ``touched`` entities reaches, with their propagation depth.

    Exceeding ``max_depth`` raises 54001 (as PostgreSQL's stack depth errors).
    """
    depth: dict[str, int] = {e: 0 for e in touched if e in specs}
    frontier = set(touched)
    level = 0
    while frontier:
        level += 1
        nxt = {
            e for e, spec in specs.items()
            if any(parent in frontier for _, parent in spec.embeds) and e not in depth
        }
        if not nxt:
            break
        if level > max_depth:
            raise TviewError("54001", f"TVIEW propagation depth exceeds max_propagation_depth "
                                      f"({max_depth})")
        for e in nxt:
            depth[e] = level
        frontier = nxt
    for e in depth:  # inside a self-referencing TVIEW, a bounded term's levels count too
        tree = specs[e].tree
        if tree is not None and tree.bounded_depth > max_depth:
            raise TviewError("54001", f"TVIEW {specs[e].table}: propagation through "
                                      f"{tree.table}.{tree.link} ({tree.bounded_depth} levels)"
                                      f" exceeds max_propagation_depth ({max_depth})")
    return depth


class _AllKeys:
    """Marker in a touched key set: the statement's keys are unknown, every row counts."""

    def __repr__(self) -> str:
        return "ALL_KEYS"


ALL_KEYS: Hashable = _AllKeys()


@dataclass(frozen=True)
class KeysWhen:
    """Marker in a touched key set: every row counts when ``condition`` (SQL) holds at refresh
    time (opaque writes the proxy has not heard about yet, tview/opaque.py)."""

    condition: str


def _explicit(keys: Collection[Hashable]) -> list[Hashable]:
    return [k for k in keys if k is not ALL_KEYS and not isinstance(k, KeysWhen)]


@dataclass(frozen=True)
class _Touch:
    """The shape of one entity's touched keys: what the SQL depends on, not the values."""

    named: bool
    every: bool
    conditions: tuple[str, ...]
    one: bool = False  # a single key


_NAMED = _Touch(True, False, ())
_NAMED_ONE = _Touch(True, False, (), True)


def _plain(keys: Collection[Hashable]) -> bool:
    """Only keys (no ALL_KEYS, no KeysWhen): the common case, told without building anything."""
    return ALL_KEYS not in keys and all(type(k) is not KeysWhen for k in keys)


def _shape(touched: Mapping[str, Collection[Hashable]]) -> tuple[tuple[str, _Touch], ...]:
    out = []
    for e, keys in touched.items():
        if _plain(keys):
            out.append((e, _NAMED_ONE if len(keys) == 1 else _NAMED))
            continue
        every = ALL_KEYS in keys
        conds = () if every else tuple(sorted({k.condition for k in keys
                                               if isinstance(k, KeysWhen)}))
        out.append((e, _Touch(not every and bool(_explicit(keys)), every, conds)))
    out.sort(key=_first)
    return tuple(out)


def _first(item: tuple[str, _Touch]) -> str:
    return item[0]


@dataclass(frozen=True)
class _Template:
    """A plan with its keys left out: per statement, the entities whose named keys it binds."""

    entities: tuple[str, ...]
    statements: tuple[str, ...]
    slots: tuple[tuple[str, ...], ...]
    first_refresh: int
    names: tuple[bytes, ...]
    full: tuple[str, ...]

    def bind(self, touched: Mapping[str, Collection[Hashable]]) -> RefreshPlan:
        keys = {}
        for s in self.slots:
            for e in s:
                if e not in keys:
                    named = touched[e]
                    keys[e] = list(named) if len(named) == 1 and _plain(named) else sorted(
                        _explicit(named), key=str)
        params = tuple(tuple(keys[e] for e in s) for s in self.slots)
        return RefreshPlan(self.entities, self.statements, params, self.first_refresh,
                           self.names, self.full)


@dataclass
class _Params:
    """Parameter numbering of one statement: one array per entity with named keys."""

    types: Mapping[str, str]
    slots: list[str] = field(default_factory=list)

    def array(self, e: str) -> str:
        if e not in self.slots:
            self.slots.append(e)
        # behind a scalar subquery: no plan sees the values (the module's docstring)
        return f"(SELECT ${self.slots.index(e) + 1}::{self.types[e]}[])"


class _Builder:
    """The SQL of one plan shape."""

    def __init__(self, specs: Mapping[str, TviewSpec], order: Sequence[str],
                 shape: Mapping[str, _Touch], key_types: Mapping[str, str], lock_namespace: int,
                 reach: Mapping[str, int], all_keys: Mapping[str, str],
                 derived: Mapping[str, Sequence[tuple[str, str]]],
                 fk_sources: Mapping[tuple[str, str], str], max_depth: int = 100) -> None:
        self.specs, self.shape, self.types = specs, shape, key_types
        self.ns = int(lock_namespace)
        self.reach, self.all_keys, self.derived, self.fk_sources = reach, all_keys, derived, \
            fk_sources
        self.rank = {e: i for i, e in enumerate(order)}
        self.max_depth = max_depth

    # -- key sets ---------------------------------------------------------------------------

    def direct(self, p: _Params, e: str, seen: tuple[str, ...], expand: bool) -> list[str]:
        """SELECTs of the keys of ``e`` the transaction names or fully refreshes, and of the
        parents of aggregated children it wrote."""
        return self._everything(e) + self._named(p, e, seen, expand)

    def _everything(self, e: str) -> list[str]:
        """Every key of ``e`` (refreshed fully), or every key when an opaque write happened.
        Old parents that are not known (a self-referencing TVIEW) count the same."""
        if e not in self.all_keys:
            return []
        for t in (self.shape.get(e), self._old_touch(e)):
            if t is None:
                continue
            if t.every:
                return [self.all_keys[e]]
            if t.conditions:
                return [f"SELECT * FROM ({self.all_keys[e]}) a WHERE "
                        f"{' OR '.join(t.conditions)}"]
        return []

    def _named(self, p: _Params, e: str, seen: tuple[str, ...], expand: bool) -> list[str]:
        """The keys of ``e`` the transaction names, and the parents of aggregated children."""
        parts = []
        t = self.shape.get(e)
        if t is not None and t.named and not (t.every and e in self.all_keys):
            parts.append(f"SELECT unnest({p.array(e)})")
        for child, template in self.derived.get(e, ()):
            if child in self.shape and child not in seen:
                inner = self.keys(p, child, (*seen, e), expand)
                if inner is not None:
                    parts.append(template.replace("{keys}", inner))
        return parts

    def expansions(self, p: _Params, e: str, seen: tuple[str, ...]) -> list[str]:
        """SELECTs of the rows of ``tv_e`` embedding a parent whose rows are refreshed."""
        spec = self.specs.get(e)
        if spec is None:
            return []
        tv = f"{q(spec.schema)}.{q(spec.table)}"
        parts = []
        for fk, parent in spec.embeds:
            if parent in seen or (parent not in self.reach and parent not in self.shape):
                continue
            inner = self.keys(p, parent, (*seen, e), True)
            if inner is not None:
                parts.append(f"SELECT t.{q(spec.pk)} FROM {tv} t WHERE t.{q(fk)} IN ({inner})")
        return parts

    def keys(self, p: _Params, e: str, seen: tuple[str, ...], expand: bool) -> str | None:
        every = self._everything(e)
        parts = self._named(p, e, seen, expand)
        if expand:
            parts += self.expansions(p, e, seen)
            if parts and self._grows(e):
                spec = self.specs[e]
                old = self._old_parents(p, e)
                parts = [self_keys(spec, " UNION ".join(parts), old, self.max_depth)]
        parts = every + parts
        return " UNION ".join(parts) if parts else None

    def _grows(self, e: str) -> bool:
        """Whether the keys of ``e`` reach other rows of it (a self-referencing TVIEW that is
        not refreshed whole anyway)."""
        spec = self.specs.get(e)
        return (spec is not None and spec.tree is not None and bool(spec.tree.terms)
                and not any(self.all_keys[e] == part for part in self._everything(e)))

    def _old_touch(self, e: str) -> _Touch | None:
        """The touched old parents of the rows of a self-referencing ``e`` (a pseudo-entity)."""
        spec = self.specs.get(e)
        old = spec.tree.parents if spec is not None and spec.tree is not None else None
        return self.shape.get(old) if old is not None else None

    def _old_parents(self, p: _Params, e: str) -> str | None:
        """SELECT of the old parents of the rows of ``e`` the transaction wrote."""
        t = self._old_touch(e)
        tree = self.specs[e].tree
        if t is None or not t.named or tree is None or tree.parents is None:
            return None
        return f"SELECT unnest({p.array(tree.parents)})"

    def has_expansion(self, e: str, seen: tuple[str, ...] = ()) -> bool:
        if self.expansions(_Params(self.types), e, seen):
            return True
        if self._grows(e) and self._named(_Params(self.types), e, seen, True):
            return True
        old = self._old_touch(e)
        if old is not None and (old.every or old.conditions):
            return True  # old parents unknown: every row, not only the keys named
        return any(child in self.shape and child not in seen
                   and self.has_expansion(child, (*seen, e))
                   for child, _ in self.derived.get(e, ()))

    def tree_reads(self, p: _Params, e: str) -> list[tuple[str, str, bool]]:
        """Shared locks on the ancestors the rows of a self-referencing TVIEW read, for the
        keys known before anything is read (the gate)."""
        spec = self.specs[e]
        levels = spec.tree.reads_up if spec.tree is not None and self._grows(e) else 0
        parts = self._named(p, e, (), False) if levels else []
        if not parts:
            return []
        bound = self.max_depth if levels == UNBOUNDED else levels
        return [(e, walk_keys(spec, " UNION ".join(parts), bound, False), False)]

    # -- statements -------------------------------------------------------------------------

    def full_reach(self, e: str, seen: tuple[str, ...] = ()) -> bool:
        """Whether the rows of ``e`` to refresh are every row (or every row when a condition
        holds): its keys are all of them, or it embeds such a parent, or aggregates such
        children.  Such a TVIEW is locked whole (:meth:`_locks`), never key by key: a lock per
        row of a big table would exhaust PostgreSQL's lock table."""
        if self._everything(e):
            return True
        seen = (*seen, e)
        spec = self.specs.get(e)
        if spec is not None and any(
                parent not in seen and (parent in self.reach or parent in self.shape)
                and self.full_reach(parent, seen) for _, parent in spec.embeds):
            return True
        return any(child in self.shape and child not in seen and self.full_reach(child, seen)
                   for child, _ in self.derived.get(e, ()))

    def _locks(self, rows: list[tuple[str, str, bool]],
               whole: Sequence[tuple[str, bool]] = (), parents: Sequence[str] = ()) -> str:
        """CTEs ``w`` (a lock per TVIEW of the plan, first: exclusive on one refreshed whole,
        shared otherwise), ``parents`` (the parent keys of each level, read once for the
        levels above), ``g`` (rank, key, exclusive) and ``c`` (the key locks, in global
        order), then the no-op UPDATEs of the rows locked shared under REPEATABLE READ and
        SERIALIZABLE.
        Key lock ``(lock_namespace, h)`` with ``h = hashtext(rank || ':' || key)``, TVIEW lock
        ``(lock_namespace + 1, rank)``; the global order is (rank, h), exclusive first (an
        integer sort, whatever the collation of the keys' text)."""
        ctes = []
        after = ""
        if whole:
            order = sorted((self.rank[e], x) for e, x in whole)
            values = ", ".join(f"({r}, {str(x).lower()})" for r, x in order)
            ctes.append(
                f"w AS MATERIALIZED (SELECT count(CASE WHEN x THEN pg_advisory_xact_lock("
                f"{self.ns + 1}, r) ELSE pg_advisory_xact_lock_shared({self.ns + 1}, r) END)"
                f" AS n FROM (SELECT r, x FROM (VALUES {values}) v(r, x) ORDER BY r) o)")
            after = " WHERE (SELECT n FROM w) >= 0"
            if not rows:
                return f"WITH {ctes[0]} SELECT n FROM w"
        ctes += parents
        union = " UNION ALL ".join(
            f"SELECT {self.rank[e]} AS r, k::{self.specs[e].pk_type}::text AS k, {str(x).lower()}"
            f" AS x FROM ({sql}) s(k)" for e, sql, x in rows)
        keyed = f"SELECT r, k, x FROM ({union}) l WHERE k IS NOT NULL"
        shared = list(dict.fromkeys(e for e, _, x in rows if not x))
        if not shared:  # every key rewritten: exclusive locks in (rank, h) order, nothing else
            locks = (f"SELECT count(pg_advisory_xact_lock({self.ns}, h)) AS n FROM (SELECT r, "
                     f"hashtext(r || ':' || k) AS h FROM ({keyed}) g{after} ORDER BY r, h) o")
            return f"WITH {', '.join(ctes)} {locks}" if ctes else locks
        lock = (f"CASE WHEN x THEN pg_advisory_xact_lock({self.ns}, h) "
                f"ELSE pg_advisory_xact_lock_shared({self.ns}, h) END")
        # under REPEATABLE READ/SERIALIZABLE, a no-op UPDATE of the rows read (shared): a later
        # rewriter of one whose snapshot predates it fails with 40001, and so does this one
        # if a rewriter committed after its snapshot.  Rewritten rows need none: the refresh's
        # upsert or delete fails the same way.  A key named twice is locked twice (advisory
        # locks stack): no grouping for READ COMMITTED to pay for
        ctes += [f"g AS MATERIALIZED ({keyed})",
                 f"c AS MATERIALIZED (SELECT count({lock}) AS n FROM "
                 f"(SELECT r, hashtext(r || ':' || k) AS h, x FROM g{after} "
                 f"ORDER BY r, h, x DESC) o)"]
        read = "(SELECT r, k FROM g GROUP BY r, k HAVING NOT bool_or(x))"
        touch = self.specs[shared[0]].touch
        if touch is not None and all(self.specs[e].touch == touch for e in shared):
            # the catalog's function, in (rank, key) order like the one-key gate's: readers of
            # one parent then meet in the same order, and READ COMMITTED opens no tv_ table
            meta = ", ".join(
                f"({self._touch_row(e)})" for e in shared)
            return (f"WITH {', '.join(ctes)} SELECT n, CASE WHEN current_setting("
                    f"'transaction_isolation') <> 'read committed' THEN (SELECT count({touch}("
                    f"o.tv::regclass, o.pk, o.typ::regtype, o.k)) FROM (SELECT g.r, g.k, m.tv, "
                    f"m.pk, m.typ FROM {read} g JOIN (VALUES {meta}) m(r, tv, pk, typ) ON "
                    f"m.r = g.r ORDER BY g.r, g.k) o) END FROM c")
        bumps = []
        for e in shared:
            spec = self.specs[e]
            tv, pk = f"{q(spec.schema)}.{q(spec.table)}", q(spec.pk)
            bumps.append(f"b{self.rank[e]} AS (UPDATE {tv} t SET {pk} = t.{pk} WHERE "
                         f"current_setting('transaction_isolation') <> 'read committed' AND "
                         f"(SELECT n FROM c) >= 0 AND "  # after the locks: no deadlock
                         f"t.{pk} IN (SELECT k::{spec.pk_type} FROM {read} g WHERE r = "
                         f"{self.rank[e]}))")
        return f"WITH {', '.join([*ctes, *bumps])} SELECT n FROM c"

    def _embedded(self) -> set[str]:
        return {parent for s in self.specs.values() for _, parent in s.embeds}

    def _parent_keys(self, e: str, fk: str) -> str:
        """SELECT of the parent keys (column ``fk``) of the rows of ``e`` named ``{keys}``: from
        its own base table when the catalog knows it, else from its view."""
        spec = self.specs[e]
        return self.fk_sources.get((e, fk)) or (
            f"SELECT v.{q(fk)} FROM {q(spec.schema)}.{q(spec.view)} v WHERE v.{q(spec.pk)} IN "
            f"({{keys}})")

    def _touch_literals(self, e: str) -> tuple[str, str, str]:
        """``e``'s tv_ table, pk column and pk type as SQL literals (the arguments of the
        catalog's touch function but the key)."""
        sp = self.specs[e]
        return _literal(f"{q(sp.schema)}.{q(sp.table)}"), _literal(sp.pk), _literal(sp.pk_type)

    def _touch_row(self, e: str) -> str:
        """``rank, tv_ table, pk column, pk type`` of ``e``: a VALUES row for the touch query."""
        return ", ".join((str(self.rank[e]), *self._touch_literals(e)))

    def gate(self, entities: Sequence[str]) -> tuple[str, _Params] | None:
        one = self._gate_one(entities)
        if one is not None:
            return one
        p = _Params(self.types)
        rows: list[tuple[str, str, bool]] = []
        parents: list[str] = []  # CTEs: the parent keys of one level, read once
        needed = False

        def up(e: str, sql: str, seen: tuple[str, ...], arr: str | None = None) -> None:
            for fk, parent in self.specs[e].embeds:
                if parent in self.specs and parent not in seen:
                    name = f"p{len(parents)}"
                    src = self._parent_keys(e, fk)
                    if arr is not None and "IN ({keys})" in src:
                        # keys named by value: one index scan for all (as the refresh reads)
                        src = src.replace("IN ({keys})", f"= ANY({arr})")
                    parents.append(f"{name} AS MATERIALIZED ({src.replace('{keys}', sql)})")
                    psql = f"SELECT * FROM {name}"
                    rows.append((parent, psql, False))
                    up(parent, psql, (*seen, parent))

        embedded = self._embedded()
        whole = [(e, self.full_reach(e)) for e in entities]
        for e, full in whole:
            if full:  # locked whole, exclusive: no lock per row
                needed = True
                continue
            parts = self.direct(p, e, (), False)
            if not parts:
                continue
            sql = " UNION ".join(parts)
            rows.append((e, sql, True))
            # (p.array numbers a parameter: only for keys the plan binds already)
            named = e in p.slots and parts == [f"SELECT unnest({p.array(e)})"]
            up(e, sql, (e,), f"{p.array(e)}::{self.types[e]}[]" if named else None)
            reads = self.tree_reads(p, e)
            rows += reads
            t = self.shape.get(e)
            spec = self.specs[e]
            # a TVIEW fed only by its own base rows (row-locked by the writes) needs no gate
            if (spec.embeds or self.derived.get(e) or e in embedded or t is None
                    or t.every or t.conditions or reads):
                needed = True
        if not needed:
            return None
        return self._locks(rows, whole, parents), p

    def _gate_one(self, entities: Sequence[str]) -> tuple[str, _Params] | None:
        """The gate when every key it locks is one value a scalar expression gives (one key
        named per TVIEW, its parents by their fk): the lock calls in (rank, key hash) order in one
        target list, no CTE, sort or aggregate (the general gate costs PostgreSQL about three
        times as much to start and run).  Each key is read once, in a LATERAL chain (a parent's
        key from its child's).  Under REPEATABLE READ the rows locked shared get their no-op
        UPDATE from the catalog's function, called only then: one call per row when no rank
        has two keys, else one query in (rank, key) order.  None: use the general gate."""
        p = _Params(self.types)
        rows: list[tuple[str, str, bool]] = []  # (entity, scalar SQL of its key, exclusive)
        embedded = self._embedded()
        needed = False

        def up(e: str, alias: str, seen: tuple[str, ...]) -> bool:
            for fk, parent in self.specs[e].embeds:
                if parent in self.specs and parent not in seen:
                    src = self._parent_keys(e, fk)
                    if self.specs[parent].touch is None or "IN ({keys})" not in src:
                        return False
                    rows.append((parent, f"({src.replace('IN ({keys})', f'= {alias}.k')})",
                                 False))
                    if not up(parent, f"l{len(rows) - 1}", (*seen, parent)):
                        return False
            return True

        for e in entities:
            spec, t = self.specs[e], self.shape.get(e)
            if any(c in self.shape for c, _ in self.derived.get(e, ())):
                return None  # parents of aggregated children: a set
            if t is None:
                continue
            if not t.one or spec.tree is not None or self.full_reach(e):
                return None
            rows.append((e, f"({p.array(e)})[1]", True))
            if not up(e, f"l{len(rows) - 1}", (e,)):
                return None
            if spec.embeds or e in embedded:
                needed = True
        if not needed:
            return None
        keys = [f"l{i}.k::{self.specs[e].pk_type}::text" for i, (e, _, _) in enumerate(rows)]
        source = ", ".join(
            f"LATERAL (SELECT {sql} AS k OFFSET 0) l{i}" if i else f"(SELECT {sql} AS k) l{i}"
            for i, (_, sql, _) in enumerate(rows))
        calls = [f"pg_advisory_xact_lock_shared({self.ns + 1}, {r})"
                 for r in sorted(self.rank[e] for e in entities)]
        by_rank: dict[int, list[tuple[str, bool]]] = {}
        for (e, _, x), k in zip(rows, keys, strict=True):
            by_rank.setdefault(self.rank[e], []).append((k, x))
        for r in sorted(by_rank):
            ranked = by_rank[r]
            if len(ranked) == 1:
                k, x = ranked[0]
                fn = "pg_advisory_xact_lock" if x else "pg_advisory_xact_lock_shared"
                calls.append(f"{fn}({self.ns}, hashtext('{r}:' || {k}))")
                continue
            values = ", ".join(f"({k}, {str(x).lower()})" for k, x in ranked)
            calls.append(  # in the general gate's order: (rank, h), exclusive first
                f"(SELECT count(CASE WHEN x THEN pg_advisory_xact_lock({self.ns}, h) "
                f"ELSE pg_advisory_xact_lock_shared({self.ns}, h) END) FROM (SELECT "
                f"hashtext('{r}:' || k) AS h, bool_or(x) AS x FROM (VALUES {values}) v(k, x) "
                f"WHERE k IS NOT NULL GROUP BY k ORDER BY h, x DESC) o)")
        shared = [(e, k) for (e, _, x), k in zip(rows, keys, strict=True) if not x]
        if shared:  # after the locks, in (rank, key) order
            rr = "current_setting('transaction_isolation') <> 'read committed'"
            touch = next(self.specs[e].touch for e, _ in shared)
            if all(len(v) == 1 for v in by_rank.values()):
                calls += [f"CASE WHEN {rr} THEN {touch}({self._touch_args(e)}, {k}) END"
                          for e, k in sorted(shared, key=lambda s: self.rank[s[0]])]
            else:
                values = ", ".join(f"({self._touch_row(e)}, {k}, {str(x).lower()})"
                                   for (e, _, x), k in zip(rows, keys, strict=True))
                calls.append(
                    f"CASE WHEN {rr} THEN (SELECT count({touch}(tv::regclass, pk, typ::regtype,"
                    f" k)) FROM (SELECT r, tv, pk, typ, k FROM (VALUES {values}) v(r, tv, pk, "
                    f"typ, k, x) WHERE k IS NOT NULL GROUP BY r, tv, pk, typ, k HAVING NOT "
                    f"bool_or(x) ORDER BY r, k) o) END")
        return f"SELECT {', '.join(calls)} FROM {source}", p

    def _touch_args(self, e: str) -> str:
        """The touch function's arguments but the key, for a direct call (names resolved when
        called, as the VALUES rows' are)."""
        tv, pk, typ = self._touch_literals(e)
        return f"{tv}::text::regclass, {pk}, {typ}::text::regtype"

    def expand(self, entities: Sequence[str]) -> tuple[str, _Params] | None:
        p = _Params(self.types)
        rows = []
        for e in entities:
            if self.has_expansion(e) and not self.full_reach(e):
                sql = self.keys(p, e, (), True)
                assert sql is not None
                rows.append((e, sql, True))
        if not rows:
            return None
        return self._locks(rows), p

    def refresh(self, e: str) -> tuple[str, _Params]:
        spec = self.specs[e]
        p = _Params(self.types)
        t = self.shape.get(e)
        tv, view, pk = f"{q(spec.schema)}.{q(spec.table)}", f"{q(spec.schema)}.{q(spec.view)}", \
            q(spec.pk)
        cols = ", ".join(q(c) for c in spec.columns)
        rest = [c for c in spec.columns if c != spec.pk]
        assign = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in rest)
        old = ", ".join(f"t.{q(c)}" for c in rest)
        new = ", ".join(f"EXCLUDED.{q(c)}" for c in rest)
        only_named = (t is not None and t.named and not t.every and not t.conditions
                      and not self.has_expansion(e)
                      and not any(c in self.shape for c, _ in self.derived.get(e, ())))

        def statement(head: str, gone: str, keys: str, cascaded: str = "0") -> str:
            """``head`` (CTEs ending in ``src``, the view's rows of the keys), the upsert of
            them, the delete of the keys' rows ``gone`` from the view, and the counts."""
            return (
                f"WITH {head}, up AS (INSERT INTO {tv} AS t ({cols}) SELECT {cols} FROM src"
                f" ON CONFLICT ({pk}) DO UPDATE SET {assign}"
                f" WHERE ROW({old}) IS DISTINCT FROM ROW({new}) RETURNING 1),"
                f" del AS (DELETE FROM {tv} t WHERE {gone} RETURNING 1)"
                f" SELECT {keys} AS keys, (SELECT count(*) FROM up) AS upserted,"
                f" (SELECT count(*) FROM del) AS deleted, {cascaded} AS cascaded")

        # a key missing from src is a row to delete; with as many src rows as keys there is
        # none (src has one row per key at most: the upsert fails on a second one), and the
        # one-time filter skips the delete's lookups of the keys
        missing = f"NOT EXISTS (SELECT 1 FROM src WHERE src.{pk} = t.{pk})"
        if only_named and t is not None and t.one:
            # one key (the common OLTP commit): the view row read by it, no key set to build
            key = f"({p.array(e)})[1]"
            return statement(
                f"src AS MATERIALIZED (SELECT {cols} FROM {view} WHERE {pk} = {key})",
                f"NOT EXISTS (SELECT 1 FROM src) AND t.{pk} = {key}", "1"), p
        if only_named:
            # keys named by value: one index scan of the view's pk for all of them (the
            # planner takes an array it cannot see for ten keys, so nested loops), cheaper than
            # a lookup per key; their count is the array's
            arr = f"{p.array(e)}::{self.types[e]}[]"
            return statement(
                f"src AS MATERIALIZED (SELECT {cols} FROM {view} WHERE {pk} = ANY({arr}))",
                f"(SELECT count(*) FROM src) < cardinality({arr}) AND t.{pk} = ANY({arr})"
                f" AND {missing}", f"cardinality({arr})"), p
        sql = self.keys(p, e, (), True)
        keyset = f"SELECT DISTINCT pk FROM ({sql}) s(pk) WHERE pk IS NOT NULL"
        if t is not None and (t.every or t.conditions):
            cascaded = "0"
        elif t is not None and t.named:
            # (an array expression: ALL of a bare subquery would compare with its rows)
            cascaded = (f"(SELECT count(*) FROM k WHERE pk <> ALL({p.array(e)}::"
                        f"{self.types[e]}[]))")
        else:
            cascaded = "(SELECT count(*) FROM k)"
        # one lookup of the view per key (OFFSET 0 keeps it a lookup): the cost grows with the
        # keys, whatever the estimates of a generic plan and the size of the tables
        return statement(
            f"k AS MATERIALIZED ({keyset}), src AS MATERIALIZED (SELECT v.* FROM k, LATERAL"
            f" (SELECT {cols} FROM {view} WHERE {pk} = k.pk OFFSET 0) v)",
            f"(SELECT count(*) FROM src) < (SELECT count(*) FROM k) AND t.{pk} IN"
            f" (SELECT pk FROM k) AND {missing}", "(SELECT count(*) FROM k)", cascaded), p


def plan_refresh(
    specs: Mapping[str, TviewSpec],
    order: Sequence[str],
    touched: Mapping[str, Collection[Hashable]],
    key_types: Mapping[str, str],
    lock_namespace: int,
    max_depth: int = 100,
    all_keys: Mapping[str, str] | None = None,
    derived: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    fk_sources: Mapping[tuple[str, str], str] | None = None,
    *,
    cache: dict[object, _Template] | None = None,
) -> RefreshPlan | None:
    """The plan for keys ``touched`` (entity -> pks; base entities and TVIEW entities alike;
    ``key_types`` gives the SQL type of each touched entity's key).  None when nothing is
    affected.

    ``all_keys``: entity -> a SELECT of every key, used when a key set holds ``ALL_KEYS``.
    ``derived``: entity -> ``(child entity, template)``: keys of the entity computed from a
    child's keys at refresh time (the current fk of aggregated children); ``{keys}`` in the
    template is replaced by the child's key query.  ``fk_sources``: (entity, fk column) -> a
    SELECT of that column from the entity's own base table for keys ``{keys}`` (cheaper than the
    view, same new state).  ``cache``: templates by
    shape (one dict per catalog), so a COMMIT of a known shape builds no SQL.
    """
    touched = {e: keys for e, keys in touched.items() if keys}
    shape_key = (_shape(touched), int(lock_namespace), max_depth)
    template = cache.get(shape_key) if cache is not None else None
    if template is None:
        template = _template(specs, order, touched, key_types, lock_namespace, max_depth,
                             all_keys or {}, derived or {}, fk_sources or {})
        if template is None:
            return None
        if cache is not None:
            if len(cache) > 1024:
                cache.clear()
            cache[shape_key] = template
    return template.bind(touched)


def _template(specs: Mapping[str, TviewSpec], order: Sequence[str],
              touched: Mapping[str, Collection[Hashable]], key_types: Mapping[str, str],
              lock_namespace: int, max_depth: int, all_keys: Mapping[str, str],
              derived: Mapping[str, Sequence[tuple[str, str]]],
              fk_sources: Mapping[tuple[str, str], str]) -> _Template | None:
    shape = dict(_shape(touched))
    reached = set(shape)
    for e, children in derived.items():
        if any(c in shape for c, _ in children):
            reached.add(e)
    reach = affected(specs, reached, max_depth)
    entities = tuple(e for e in order if e in reach)
    if not entities:
        return None
    b = _Builder(specs, order, shape, key_types, lock_namespace, reach, all_keys, derived,
                 fk_sources, max_depth)
    statements: list[str] = []
    slots: list[tuple[str, ...]] = []
    for part in (b.gate(entities), b.expand(entities)):
        if part is not None:
            statements.append(part[0])
            slots.append(tuple(part[1].slots))
    first = len(statements)
    for e in entities:
        sql, p = b.refresh(e)
        statements.append(sql)
        slots.append(tuple(p.slots))
    full = tuple(e for e in entities if e in shape and (shape[e].every or shape[e].conditions))
    return _Template(entities, tuple(statements), tuple(slots), first,
                     tuple(statement_name(s) for s in statements), full)
