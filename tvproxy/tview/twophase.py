"""Two-phase commit (DESIGN §5.6): the refresh queue of a prepared transaction is persisted in
``<schema>.pending_refresh`` inside that transaction, so whoever commits it — through any proxy,
or straight on the server — is followed by a catch-up refresh of those keys.

A row is visible only once its transaction committed (COMMIT PREPARED); ROLLBACK PREPARED takes
it away with the transaction.  The catch-up (after a COMMIT PREPARED seen by the proxy, on start
and every ``recovery_interval``) locks visible rows with SKIP LOCKED, refreshes their keys in a
new transaction and deletes them.  Nothing here commits or rolls back anyone's prepared
transaction.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.planner import ALL_KEYS, plan_refresh

_ALL = "*"


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


def insert_sql(schema: str) -> str:
    return (f"INSERT INTO {q(schema)}.pending_refresh (gid, database, keys) VALUES ($1, $2,"
            f" $3::jsonb) ON CONFLICT (gid) DO UPDATE SET keys = EXCLUDED.keys")


async def catch_up(conn: Any, cat: RuntimeCatalog, schema: str, database: str,
                   lock_namespace: int, max_depth: int, gid: str | None = None) -> list[str]:
    """Refresh the keys of committed prepared transactions (one ``gid`` or all visible) and
    delete their rows; returns the gids done."""
    done: list[str] = []
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
            if plan is not None:
                for stmt, params in zip(plan.statements, plan.params, strict=True):
                    await conn.fetch(stmt, *params)
            await conn.execute(f"DELETE FROM {q(schema)}.pending_refresh WHERE gid = $1", row[0])
            done.append(row[0])
    return done
