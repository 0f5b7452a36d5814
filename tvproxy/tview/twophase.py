"""Two-phase commit (DESIGN §5.6): the refresh queue of a prepared transaction is persisted in
``<schema>.pending_refresh`` inside that transaction, so whoever commits it — through any proxy,
or straight on the server — is followed by a catch-up refresh of those keys.

A row is visible only once its transaction committed (COMMIT PREPARED); ROLLBACK PREPARED takes
it away with the transaction.  The catch-up (after a COMMIT PREPARED seen by the proxy, on start
and every ``recovery_interval``, or ``tvproxy recover``) locks visible rows with SKIP LOCKED,
refreshes their keys in a new transaction and deletes them.  Nothing here commits or rolls back
anyone's prepared transaction.

What is still prepared (``SHOW TVIEW PENDING``): a prepared transaction's pending_refresh row
is invisible to everyone else until it commits, so the server only tells *that* a prepared
transaction wrote one — it still holds its RowExclusiveLock on pending_refresh, which
``pg_locks`` shows — not *what* it holds.  The keys are known to the proxy instance that
persisted them: :data:`PERSISTED` remembers, per (database, gid), what this process wrote at
PREPARE, until the catch-up of that gid or until the gid is gone from the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.planner import ALL_KEYS, plan_refresh

_ALL = "*"
PREPARED = "prepared"
COMMITTED = "committed-awaiting-catch-up"


def encode_keys(keys: Mapping[str, set[Hashable]], everything: Sequence[str] = ()) -> str:
    """A transaction's touched keys as JSON (``"*"``: every row); ``everything``: entities whose
    keys are unknown (opaque writes not yet compared)."""
    out: dict[str, list[object]] = {}
    for entity, ks in keys.items():
        vals: list[object] = []
        for k in ks:
            if k is ALL_KEYS:
                vals = [_ALL]
                break
            if isinstance(k, int | str):
                vals.append(k)
        if vals:
            out[entity] = sorted(vals, key=str)
    for entity in everything:
        out[entity] = [_ALL]
    return json.dumps(out, sort_keys=True)


def decode_keys(text: str) -> dict[str, set[Hashable]]:
    raw = json.loads(text)
    return {e: {ALL_KEYS} if _ALL in ks else set(ks) for e, ks in raw.items()}


def summarize_keys(text: str) -> str:
    """A persisted queue in one short line: ``entity:count`` by entity, ``entity:*`` for every
    row of it (``post:2,user:*``)."""
    parts = []
    for entity, ks in sorted(decode_keys(text).items()):
        parts.append(f"{entity}:{_ALL if ALL_KEYS in ks else len(ks)}")
    return ",".join(parts)


def insert_sql(schema: str) -> str:
    """The queue's row.  prepared_at: when it was written, just before PREPARE (now() would be
    the start of the transaction).  A row of the same gid still there is an earlier
    transaction's, committed and waiting for its catch-up: the keys are merged, not replaced,
    so that catch-up is not lost (and a ROLLBACK PREPARED puts the row back as it was)."""
    t = f"{q(schema)}.pending_refresh"
    merged = (
        "SELECT coalesce(jsonb_object_agg(e, ks), '{}') FROM (SELECT j.e, CASE WHEN"
        " bool_or(x = '\"*\"') THEN '[\"*\"]'::jsonb ELSE jsonb_agg(DISTINCT x) END AS ks"
        f" FROM (VALUES ({t}.keys), (EXCLUDED.keys)) s(k), jsonb_each(s.k) j(e, v),"
        " jsonb_array_elements(j.v) x GROUP BY j.e) m")
    return (f"INSERT INTO {t} (gid, database, keys, prepared_at)"
            f" VALUES ($1, $2, $3::jsonb, clock_timestamp())"
            f" ON CONFLICT (gid) DO UPDATE SET keys = ({merged})")


# --- what this proxy persisted ---------------------------------------------------------------

@dataclass(frozen=True)
class PersistedQueue:
    database: str
    gid: str
    keys: str  # the JSON written to pending_refresh
    recorded_at: float  # this machine's time.time() when the PREPARE was planned


@dataclass
class PersistedQueues:
    """The queues this process wrote at PREPARE TRANSACTION, by (database, gid): the only
    source of a still-prepared transaction's keys.  Bounded (oldest out first); an entry goes
    when its gid is caught up, or when the server no longer has the gid (ROLLBACK PREPARED, a
    COMMIT PREPARED whose catch-up another instance did) and the entry is old enough that its
    PREPARE cannot still be on its way."""

    limit: int = 10_000
    # seconds a PREPARE may take after its plan was made (refresh locks): an entry older than
    # that whose gid the server lacks is dropped, and a gid prepared later is not this entry's
    settle: float = 30.0
    entries: dict[tuple[str, str], PersistedQueue] = field(default_factory=dict)

    def record(self, gid: str, database: str, keys: str) -> None:
        key = (database, gid)
        self.entries.pop(key, None)
        self.entries[key] = PersistedQueue(database, gid, keys, time.time())
        while len(self.entries) > self.limit:
            del self.entries[next(iter(self.entries))]

    def get(self, database: str, gid: str) -> PersistedQueue | None:
        return self.entries.get((database, gid))

    def has(self, database: str) -> bool:
        return any(db == database for db, _ in self.entries)

    def forget(self, database: str, gids: Iterable[str]) -> None:
        for gid in gids:
            self.entries.pop((database, gid), None)

    def prune(self, database: str, alive: set[str]) -> None:
        """Drop the entries of ``database`` whose gid the server has neither prepared nor
        pending (``alive``), once they are older than ``settle``."""
        before = time.time() - self.settle
        for (db, gid), e in list(self.entries.items()):
            if db == database and gid not in alive and e.recorded_at < before:
                del self.entries[(db, gid)]


PERSISTED = PersistedQueues()

# --- SHOW TVIEW PENDING ----------------------------------------------------------------------

# Prepared transactions of this database that wrote a pending_refresh row: they still hold
# that table's RowExclusiveLock, found through the lock on their own transaction id (pid NULL:
# held by a prepared transaction, not a backend).
_PREPARED_SQL = """
SELECT p.gid, p.prepared FROM pg_prepared_xacts p
 WHERE p.database = current_database() AND EXISTS (
   SELECT 1 FROM pg_locks x JOIN pg_locks r ON r.virtualtransaction = x.virtualtransaction
    WHERE x.locktype = 'transactionid' AND x.transactionid = p.transaction AND x.pid IS NULL
      AND r.locktype = 'relation' AND r.pid IS NULL AND r.mode = 'RowExclusiveLock'
      AND r.relation = to_regclass($1))
 ORDER BY p.prepared, p.gid"""
# How far ahead of this machine's clock the server's is, give or take (the round trip).
_CLOCK_SLACK = 2.0


@dataclass(frozen=True)
class PendingQueue:
    """One row of SHOW TVIEW PENDING."""

    gid: str
    database: str
    keys: str | None  # summarize_keys(); None: prepared through another instance (unknown)
    prepared_at: datetime | None
    state: str  # PREPARED | COMMITTED


async def pending_queues(conn: Any, schema: str, database: str) -> list[PendingQueue]:
    """The persisted 2PC queues of ``database``: still prepared (keys from :data:`PERSISTED`
    when this process wrote them), then committed and waiting for their catch-up."""
    table = f"{q(schema)}.pending_refresh"
    offset = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())")) - (
        time.time())
    prepared = await conn.fetch(_PREPARED_SQL, table)
    committed = await conn.fetch(
        f"SELECT gid, keys::text, prepared_at FROM {table} WHERE database = $1"
        f" ORDER BY prepared_at, gid", database)
    out = []
    for gid, at in prepared:
        mine = PERSISTED.get(database, gid)
        # only a transaction prepared right after this process wrote the queue is that queue's:
        # not one that held the gid before, nor one that took it later (after a PREPARE here
        # that failed, through another instance); those keys are unknown
        if mine is not None and not (
                mine.recorded_at - _CLOCK_SLACK <= at.timestamp() - offset
                <= mine.recorded_at + PERSISTED.settle):
            mine = None
        out.append(PendingQueue(gid, database, summarize_keys(mine.keys) if mine else None, at,
                                PREPARED))
    out += [PendingQueue(gid, database, summarize_keys(keys), at, COMMITTED)
            for gid, keys, at in committed]
    PERSISTED.prune(database, {r.gid for r in out})
    return out


# --- catch-up --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaughtUp:
    """One committed prepared transaction whose keys were refreshed and row deleted."""

    gid: str
    keys: str  # summarize_keys() of its queue
    refreshed: tuple[tuple[str, int, int], ...]  # (tv_ table, rows upserted, rows deleted)


async def catch_up_report(conn: Any, cat: RuntimeCatalog, schema: str, database: str,
                          lock_namespace: int, max_depth: int,
                          gid: str | None = None) -> list[CaughtUp]:
    """Refresh the keys of committed prepared transactions (one ``gid`` or all visible) and
    delete their rows, in one transaction; what was done, by gid."""
    done: list[CaughtUp] = []
    sql = (f"SELECT gid, keys::text FROM {q(schema)}.pending_refresh WHERE database = $1"
           + (" AND gid = $2" if gid is not None else "") + " FOR UPDATE SKIP LOCKED")
    args = (database, gid) if gid is not None else (database,)
    async with conn.transaction():
        rows = await conn.fetch(sql, *args)
        for row in rows:
            keys = {e: v for e, v in decode_keys(row[1]).items() if e in cat.key_types}
            plan = plan_refresh(cat.specs, cat.order, keys, cat.key_types, lock_namespace,
                                max_depth, cat.all_keys, cat.derived,
                                cat.fk_sources) if keys else None
            refreshed: list[tuple[str, int, int]] = []
            if plan is not None:
                for i, (stmt, params) in enumerate(
                        zip(plan.statements, plan.params, strict=True)):
                    result = await conn.fetch(stmt, *params)
                    if (plan.first_refresh <= i < plan.first_refresh + len(plan.entities)
                            and result):  # one row per TVIEW: keys, upserted, deleted, ...
                        entity = plan.entities[i - plan.first_refresh]
                        spec = cat.specs.get(entity)
                        refreshed.append((spec.table if spec else f"tv_{entity}",
                                          int(result[0]["upserted"] or 0),
                                          int(result[0]["deleted"] or 0)))
            await conn.execute(f"DELETE FROM {q(schema)}.pending_refresh WHERE gid = $1", row[0])
            done.append(CaughtUp(row[0], summarize_keys(row[1]), tuple(refreshed)))
    PERSISTED.forget(database, (d.gid for d in done))
    if gid is None and PERSISTED.has(database):
        alive = await conn.fetch(
            f"SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            f" UNION SELECT gid FROM {q(schema)}.pending_refresh WHERE database = $1", database)
        PERSISTED.prune(database, {r[0] for r in alive})
    return done


async def catch_up(conn: Any, cat: RuntimeCatalog, schema: str, database: str,
                   lock_namespace: int, max_depth: int, gid: str | None = None) -> list[str]:
    """:func:`catch_up_report`, as the gids done."""
    done = await catch_up_report(conn, cat, schema, database, lock_namespace, max_depth, gid)
    return [d.gid for d in done]
