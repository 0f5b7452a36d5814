"""``tvproxy recover``: one 2PC recovery pass (DESIGN §2, §5.6) outside the server.

For each configured database with TVIEWs: the committed prepared transactions whose refresh
queue is still in ``pending_refresh`` (COMMIT PREPARED sent without the proxy seeing it) get
their catch-up — the runtime catalog loaded as the engine loads it (tview/ddl.py) and the
engine's own catch-up (tview/twophase.py) — and what remains pending is listed.  Like the
server's pass, it never commits or rolls back anyone's prepared transaction.
"""

from __future__ import annotations

import sys

import asyncpg

from tvproxy.config import Config
from tvproxy.tview import ddl, twophase

EXIT_OK = 0
EXIT_FAILURE = 1


def _error_line(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    message = " ".join(str(message).split())  # one line
    return f"{message} (SQLSTATE {sqlstate})" if sqlstate else message


async def recover_database(cfg: Config, name: str, connect: dict[str, object]) -> list[str]:
    """One 2PC catch-up pass on database ``name``, as the server's recovery pass does it (same
    catalog loading, same catch-up); ``connect``: asyncpg.connect() arguments.  The lines to
    print."""
    tv = cfg.tview
    conn = await asyncpg.connect(**{"timeout": 10, **connect})  # type: ignore[arg-type]
    try:
        cat = await ddl.load_runtime(conn, tv.schema)
        if cat.empty:
            return [f"{name}: no TVIEWs, nothing to do"]
        done = await twophase.catch_up_report(
            conn, cat, tv.schema, name, tv.lock_namespace, tv.max_propagation_depth
        )
        left = await twophase.pending_queues(conn, tv.schema, name)
    finally:
        await conn.close()
    lines = []
    for d in done:
        refreshed = "; ".join(f"{t}: {up} upserted, {dele} deleted" for t, up, dele in d.refreshed)
        lines.append(f"{name}: caught up {d.gid} (keys {d.keys or '-'}): {refreshed or 'no TVIEW'}")
    if not done:
        lines.append(f"{name}: nothing to do")
    if left:  # prepared ones wait for their COMMIT PREPARED; committed ones another pass holds
        lines.append(f"{name}: still pending: " + ", ".join(f"{p.gid} ({p.state})" for p in left))
    return lines


async def recover_all(cfg: Config, targets: dict[str, dict[str, object]]) -> int:
    """Every database of ``targets`` (name -> connect arguments) in turn; exit status 1 when
    any failed (one line on stderr each)."""
    status = EXIT_OK
    for name, connect in targets.items():
        try:
            lines = await recover_database(cfg, name, connect)
        except Exception as e:  # noqa: BLE001 - one line per database, then the next one
            print(f"tvproxy recover: database {name}: {_error_line(e)}", file=sys.stderr)
            status = EXIT_FAILURE
            continue
        for line in lines:
            print(line)
    return status


