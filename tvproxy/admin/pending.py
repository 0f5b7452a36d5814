"""``SHOW TVIEW PENDING``: the persisted 2PC refresh queues of every database with TVIEWs.

Unlike the other SHOW commands this one asks the databases (the queues live there, see
tview/twophase.py): one short-lived connection per database, all at once, on the engine's
control link.  A database that cannot be asked gives a WARNING and no rows; the others still
answer.  Rows:

- ``gid``, ``database`` (the proxy's name for it);
- ``keys``: ``entity:count`` per entity, comma-separated, ``entity:*`` when every row of the
  TVIEW is to be refreshed (``post:2,user:1``); NULL for a transaction still prepared that this
  proxy process did not prepare (another instance, or before a restart: its queue is invisible
  inside the prepared transaction until it commits);
- ``prepared_at``: when the transaction was prepared (``pg_prepared_xacts``) or, once
  committed, when its queue was written (just before PREPARE);
- ``state``: ``prepared`` (waiting for COMMIT/ROLLBACK PREPARED) or
  ``committed-awaiting-catch-up`` (committed without the proxy seeing it; the next recovery
  pass or ``tvproxy recover`` refreshes its keys and removes the row).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from tvproxy.log import get_logger
from tvproxy.protocol import build as B
from tvproxy.tview.twophase import PendingQueue, pending_queues

if TYPE_CHECKING:
    from tvproxy.server import ProxyServer

log = get_logger("tvproxy.admin")

QUERY_TIMEOUT = 10.0  # seconds for one database (connect included)


async def _database(engine: Any, database: str) -> list[PendingQueue]:
    # the engine's own control-link connection (same target and credentials as its catch-up)
    conn = await engine._connect(database)
    try:
        return await pending_queues(conn, engine.cfg.schema, database)
    finally:
        await conn.close()


async def collect(proxy: ProxyServer) -> tuple[list[PendingQueue], list[bytes]]:
    """The queues of every database whose catalog has TVIEWs, and a WARNING per database that
    could not be asked."""
    engine = proxy.tviews
    if engine is None:
        return [], []
    if not engine.loaded.is_set():  # just started: the catalogs tell which databases to ask
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.loaded.wait(), engine.load_timeout)
    names = sorted(name for name, cat in engine.catalogs.items() if not cat.empty)
    answers = await asyncio.gather(
        *(asyncio.wait_for(_database(engine, n), QUERY_TIMEOUT) for n in names),
        return_exceptions=True)
    queues: list[PendingQueue] = []
    notices: list[bytes] = []
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, BaseException):
            reason = str(answer) or type(answer).__name__
            log.warning("show tview pending failed", database=name, error=reason)
            notices.append(B.notice_response(
                f"SHOW TVIEW PENDING: database {name}: {reason}", "01000", "WARNING"))
        else:
            queues.extend(answer)
    return queues, notices
