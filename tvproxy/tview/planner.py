"""Touched keys -> the ordered refresh SQL of one transaction (pure, no I/O).

A plan is a short list of statements sent in one round trip before the COMMIT:

0. *gate*: transaction-scoped advisory locks on the TVIEW keys the transaction names and on the
   parents those rows read in their new state (fk columns of the views, transitively), before
   any key set is computed.  Two transactions whose refreshes meet in a row one of them cannot
   see yet (a post inserted under a user the other renames) take a common lock here: the
   second computes its key sets and rows after the first committed.  It returns no row.
   Under REPEATABLE READ/SERIALIZABLE it also gives the gated tv_ rows a no-op UPDATE: the
   second of two such transactions then fails with 40001, as for any concurrent update.
1. *keys*: one statement computes, on the transaction's current (pre-refresh) state, the key set
   of every affected TVIEW (explicit keys, plus rows of ``tv_e`` embedding a parent whose keys
   are in the parent's set, transitively) and keeps each set for the rest of the transaction in
   a transaction-local setting ``tvproxy.k_<hex of entity>``.  Computing all sets in one statement
   means every set sees the same old state, whatever the refresh order.
2. *locks*: transaction-scoped advisory locks on every key, in one global order (entity rank,
   key), in their own statement, before anything is recomputed.
3. *refresh*: one statement per TVIEW, dependencies first: recompute ``v_e`` for the keys,
   upsert rows that changed (``IS DISTINCT FROM``), delete rows that vanished.

Identifiers are quoted here; key values are always bound parameters (arrays).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

from tvproxy.tview.analyze import TviewError
from tvproxy.tview.analyze import quote_ident as q


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


@dataclass(frozen=True)
class RefreshPlan:
    entities: tuple[str, ...]  # refreshed TVIEWs, in order
    statements: tuple[str, ...]  # [gate], keys, locks, then one per TVIEW
    params: tuple[tuple[object, ...], ...]  # bound parameters of each statement

    @property
    def first_refresh(self) -> int:
        """Index of the first per-TVIEW refresh statement."""
        return len(self.statements) - len(self.entities)


def _setting(entity: str) -> str:
    # a valid custom setting name whatever the entity is called (hex of its name)
    return f"tvproxy.k_{entity.encode().hex()}"


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
) -> RefreshPlan | None:
    """The plan for keys ``touched`` (entity -> pks; base entities and TVIEW entities alike;
    ``key_types`` gives the SQL type of each touched entity's key).  None when nothing is
    affected.

    ``all_keys``: entity -> a SELECT of every key, used when a key set holds ``ALL_KEYS``.
    ``derived``: entity -> ``(child entity, template)``: keys of the entity computed from a
    child's keys at refresh time (the current fk of aggregated children); ``{keys}`` in the
    template is replaced by the child's key query.
    """
    all_keys = all_keys or {}
    derived = derived or {}
    touched = {e: keys for e, keys in touched.items() if keys}
    for e, children in derived.items():
        if e not in touched and any(c in touched for c, _ in children):
            touched[e] = ()
    reach = affected(specs, touched.keys(), max_depth)
    entities = tuple(e for e in order if e in reach)
    if not entities:
        return None
    params: list[object] = []
    param_no: dict[str, int] = {}  # numbered on first use: unused keys are not sent

    def param(e: str) -> int:
        if e not in param_no:
            params.append(sorted(_explicit(touched[e]), key=str))
            param_no[e] = len(params)
        return param_no[e]

    def keys_sql(e: str, seen: tuple[str, ...]) -> str:
        parts = []
        if e in touched:
            keys = touched[e]
            if ALL_KEYS in keys and e in all_keys:
                parts.append(all_keys[e])
            else:
                conds = sorted({k.condition for k in keys if isinstance(k, KeysWhen)})
                if conds and e in all_keys:
                    parts.append(f"SELECT * FROM ({all_keys[e]}) a WHERE {' OR '.join(conds)}")
                if _explicit(keys):
                    parts.append(f"SELECT unnest(${param(e)}::{key_types[e]}[])")
            for child, template in derived.get(e, ()):
                if child in touched and child not in seen:
                    parts.append(template.replace("{keys}", keys_sql(child, (*seen, e))))
        spec = specs.get(e)
        if spec is not None:
            tv = f"{q(spec.schema)}.{q(spec.table)}"
            for fk, parent in spec.embeds:
                if parent in seen or (parent not in reach and parent not in touched):
                    continue
                parts.append(f"SELECT t.{q(spec.pk)} FROM {tv} t WHERE t.{q(fk)} IN "
                             f"({keys_sql(parent, (*seen, e))})")
        return " UNION ".join(parts) if parts else f"SELECT NULL::{key_types.get(e, 'text')}"

    stash = ", ".join(
        f"cardinality(set_config('{_setting(e)}', coalesce((SELECT array_agg(DISTINCT k)::text"
        f" FROM ({keys_sql(e, ())}) s(k) WHERE k IS NOT NULL), '{{}}'), true)"
        f"::{specs[e].pk_type}[])"
        for e in entities
    )
    statements = [f"SELECT {stash}"]
    all_params: list[tuple[object, ...]] = [tuple(params)]

    rank = {e: i for i, e in enumerate(order)}
    gate = _gate_sql(specs, order, touched, key_types, lock_namespace, all_keys, fk_sources or {})
    if gate is not None:
        statements.insert(0, gate[0])
        all_params.insert(0, gate[1])
    lock_rows = " UNION ALL ".join(
        f"SELECT {rank[e]} AS r, k::text AS k FROM unnest(current_setting('{_setting(e)}')"
        f"::{specs[e].pk_type}[]) k"
        for e in entities
    )
    statements.append(
        f"SELECT count(pg_advisory_xact_lock({int(lock_namespace)}, hashtext(r || ':' || k)))"
        f" FROM (SELECT r, k FROM ({lock_rows}) l ORDER BY r, k) o")
    all_params.append(())

    for e in entities:
        statements.append(_refresh_sql(specs[e]))
        all_params.append(())
    return RefreshPlan(entities, tuple(statements), tuple(all_params))


def _gate_sql(specs: Mapping[str, TviewSpec], order: Sequence[str],
              touched: Mapping[str, Collection[Hashable]], key_types: Mapping[str, str],
              lock_namespace: int, all_keys: Mapping[str, str],
              fk_sources: Mapping[tuple[str, str], str]) -> tuple[str, tuple] | None:
    """The gate statement (module doc, step 0) and its parameters; None when the transaction
    names no TVIEW key.  ``fk_sources``: (entity, fk column) -> a SELECT of that column from
    the entity's base table for keys ``{keys}`` (cheaper than the view, same new state)."""
    rank = {e: i for i, e in enumerate(order)}
    params: list[object] = []
    rows: list[tuple[str, str]] = []  # (entity, SELECT of keys to lock)

    def up(e: str, keys: str, seen: tuple[str, ...]) -> None:
        rows.append((e, keys))
        spec = specs[e]
        view = f"{q(spec.schema)}.{q(spec.view)}"
        for fk, parent in spec.embeds:
            if parent in specs and parent not in seen:
                src = fk_sources.get((e, fk))
                up(parent, src.replace("{keys}", keys) if src is not None else
                   f"SELECT v.{q(fk)} FROM {view} v WHERE v.{q(spec.pk)} IN ({keys})",
                   (*seen, parent))

    for e in order:
        keys = touched.get(e)
        if e not in specs or not keys:
            continue
        if ALL_KEYS in keys and e in all_keys:
            up(e, all_keys[e], (e,))
            continue
        conds = sorted({k.condition for k in keys if isinstance(k, KeysWhen)})
        if conds and e in all_keys:
            up(e, f"SELECT * FROM ({all_keys[e]}) a WHERE {' OR '.join(conds)}", (e,))
        named = sorted(_explicit(keys), key=str)
        if named:
            params.append(named)
            up(e, f"SELECT unnest(${len(params)}::{key_types[e]}[])", (e,))
    if not rows:
        return None
    lock_rows = " UNION ".join(
        f"SELECT {rank[e]} AS r, k::{specs[e].pk_type}::text AS k FROM ({sql}) s(k)"
        for e, sql in rows)
    # Under REPEATABLE READ and SERIALIZABLE the snapshot predates the locks: the gated tv_
    # rows that exist get a no-op UPDATE instead, so two transactions meeting there are
    # ordered by PostgreSQL's own rule for concurrent updates (the later one fails with 40001
    # and its client retries with a snapshot that sees the other's writes).
    bumps = []
    for e in dict.fromkeys(e for e, _ in rows):
        spec = specs[e]
        tv, pk = f"{q(spec.schema)}.{q(spec.table)}", q(spec.pk)
        bumps.append(f"b{rank[e]} AS (UPDATE {tv} t SET {pk} = t.{pk} WHERE "
                     f"current_setting('transaction_isolation') <> 'read committed' AND "
                     f"(SELECT n FROM c) >= 0 AND "  # after the locks: no deadlock, just 40001
                     f"t.{pk} IN (SELECT k::{spec.pk_type} FROM g WHERE r = {rank[e]}))")
    return (f"WITH g AS MATERIALIZED (SELECT r, k FROM ({lock_rows}) l WHERE k IS NOT NULL), "
            f"c AS MATERIALIZED (SELECT count(pg_advisory_xact_lock({int(lock_namespace)}, "
            f"hashtext(r || ':' || k))) AS n FROM (SELECT r, k FROM g ORDER BY r, k) o), "
            f"{', '.join(bumps)} SELECT n FROM c WHERE n < 0", tuple(params))


def _refresh_sql(spec: TviewSpec) -> str:
    tv = f"{q(spec.schema)}.{q(spec.table)}"
    view = f"{q(spec.schema)}.{q(spec.view)}"
    pk = q(spec.pk)
    cols = ", ".join(q(c) for c in spec.columns)
    rest = [c for c in spec.columns if c != spec.pk]
    assign = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in rest)
    old = ", ".join(f"t.{q(c)}" for c in rest)
    new = ", ".join(f"EXCLUDED.{q(c)}" for c in rest)
    return (
        f"WITH k AS (SELECT unnest(current_setting('{_setting(spec.entity)}')::{spec.pk_type}[])"
        f" AS pk),"
        f" src AS MATERIALIZED (SELECT {cols} FROM {view} WHERE {pk} IN (SELECT pk FROM k)),"
        f" up AS (INSERT INTO {tv} AS t ({cols}) SELECT {cols} FROM src"
        f" ON CONFLICT ({pk}) DO UPDATE SET {assign}"
        f" WHERE ROW({old}) IS DISTINCT FROM ROW({new}) RETURNING 1),"
        f" del AS (DELETE FROM {tv} t WHERE t.{pk} IN (SELECT pk FROM k)"
        f" AND NOT EXISTS (SELECT 1 FROM src WHERE src.{pk} = t.{pk}) RETURNING 1)"
        f" SELECT (SELECT count(*) FROM up) AS upserted, (SELECT count(*) FROM del) AS deleted"
    )
