"""Following the TVIEW catalog of every database a proxy serves, coherently with the other
instances (DESIGN.md 5.1: catalog, NOTIFY, creation races).

- Every configured database gets one listener connection from the start, whether or not it
  has TVIEWs yet (a TVIEW created later through another instance, the CLI or the Python API
  must be maintained here from its COMMIT on).  It is named ``tvproxy-listener <schema>
  <generation>`` (tview/catalog.py); a lost one is reconnected, and the catalog reloaded.
- A NOTIFY on the catalog channel reloads the catalog.  If its TVIEWs changed, transactions
  open in this instance are marked (their earlier writes were captured under the old
  catalog: TviewSession.with_new_tviews refreshes the new TVIEWs whole at their COMMIT), and
  requests sent under the old catalog are let finish (an autocommit write to a newly tracked
  table commits unrefreshed: it must be visible to the creator's repair).  Then the listener's
  application_name acknowledges the generation loaded.
- Whoever changed the catalog waits until every listener acknowledged it, then diff-refreshes
  the new TVIEWs (ddl.sync_catalog), and only then reports success.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tvproxy.log import get_logger
from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.catalog import listener_name, notify_channel
from tvproxy.tview.ddl import load_versioned, sync_catalog
from tvproxy.tview.model import RuntimeCatalog

log = get_logger("tvproxy.tview")

QUIESCE_TIMEOUT = 2.0  # seconds a reload waits for requests sent under the old catalog
RELISTEN_MAX_DELAY = 5.0


class CatalogFollower:
    """One per proxy (TviewEngine.follow): the listeners, reloads and acknowledgements."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # TviewEngine: catalogs, cfg, proxy, _connect
        self.generations: dict[str, int] = {}  # catalog generation loaded, per database
        self._listeners: dict[str, Any] = {}
        self._acked: dict[str, int] = {}  # generation the listener's name acknowledges
        self._locks: dict[str, asyncio.Lock] = {}  # one operation at a time per listener
        self._relisten: dict[str, asyncio.Task[None]] = {}
        self._reload_queued: set[str] = set()  # databases a NOTIFY asked to reload
        self._closing = False
        self._tasks: set[asyncio.Future[None]] = set()  # reloads NOTIFYs started

    def listening(self, database: str) -> bool:
        return database in self._listeners or database in self._relisten

    async def start(self, database: str) -> None:
        """Listen (before loading: no change committed in between is missed), then load."""
        if not await self._listen(database):
            self._schedule_relisten(database)
        await self.reload(database)

    def _lock(self, database: str) -> asyncio.Lock:
        lock = self._locks.get(database)
        if lock is None:
            lock = self._locks[database] = asyncio.Lock()
        return lock

    async def _listen(self, database: str) -> bool:
        """Open the listener of ``database`` (every database, TVIEWs or not: one created later
        through another instance must be maintained here from its COMMIT on)."""
        if self._listeners.get(database) is not None:
            return True
        schema = self.engine.cfg.schema
        try:
            conn = await self.engine._connect(database, listener_name(schema, None))
            await conn.add_listener(notify_channel(schema),
                                    lambda *_a, db=database: self._notified(db))
            conn.add_termination_listener(
                lambda c, db=database: self._listener_lost(db, c))
        except Exception as exc:  # noqa: BLE001 - a database may be down: retried
            log.warning("tview catalog listener failed", database=database, error=str(exc))
            return False
        self._listeners[database] = conn
        self._acked.pop(database, None)
        return True

    def _notified(self, database: str) -> None:
        """A NOTIFY of the catalog channel: one reload more, unless one is already queued
        (it starts after the notification, so it sees that change)."""
        if database in self._reload_queued:
            return
        self._reload_queued.add(database)
        task = asyncio.ensure_future(self.reload(database))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listener_lost(self, database: str, conn: Any) -> None:
        if self._listeners.get(database) is not conn:
            return
        del self._listeners[database]
        self._acked.pop(database, None)
        if not self._closing:
            log.warning("tview catalog listener lost", database=database)
            self._schedule_relisten(database)

    def _schedule_relisten(self, database: str) -> None:
        if self._closing or database in self._relisten:
            return
        self._relisten[database] = asyncio.ensure_future(self._relisten_loop(database))

    async def _relisten_loop(self, database: str) -> None:
        """Reconnect a lost listener, then reload: NOTIFYs sent meanwhile were missed."""
        delay = 0.1
        try:
            while not self._closing:
                await asyncio.sleep(delay)
                if await self._listen(database):
                    await self.reload(database)
                    return
                delay = min(delay * 2, RELISTEN_MAX_DELAY)
        finally:
            self._relisten.pop(database, None)

    async def reload(self, database: str, announce: bool = False) -> None:
        """Load the catalog of ``database`` again (``announce``: tell other instances too),
        then acknowledge the generation loaded on the listener."""
        async with self._lock(database):
            self._reload_queued.discard(database)
            old = self.engine.catalog(database)
            try:
                conn = self._listeners.get(database)
                own = conn is None
                if own:
                    conn = await self.engine._connect(database)
                try:
                    generation, cat = await load_versioned(conn, self.engine.cfg.schema)
                    if announce:
                        await conn.execute(f"NOTIFY {q(notify_channel(self.engine.cfg.schema))}")
                finally:
                    if own:
                        await conn.close()
            except Exception as exc:  # noqa: BLE001 - keep the old catalog, say why
                log.warning("tview catalog load failed", database=database, error=str(exc))
                return
            self.engine.catalogs[database] = cat
            self.generations[database] = generation
            waiting = self._catalog_changed(database, old, cat)
        if not cat.empty and not cat.track_counts:
            log.warning("track_counts is off: writes through functions, triggers, CALL"
                        " or DO cannot be audited", database=database)
        if waiting:
            await self._quiesce(database, waiting)
        await self._acknowledge(database, generation)

    def _catalog_changed(self, database: str, old: RuntimeCatalog,
                         new: RuntimeCatalog) -> list[tuple[Any, Any, int]]:
        """A reload changed the TVIEWs: mark the transactions open in this database (their
        earlier writes were captured under ``old``) and return the sessions whose requests
        sent under ``old`` are still running: (client, its server, its transaction)."""
        if old.entries == new.entries:
            return []
        log.info("tview catalog changed", database=database,
                 tviews=sorted(new.entries), generation=self.generations.get(database))
        waiting = []
        for client in list(self.engine.proxy.clients):
            tv = client.tview
            if (client.database != database or client.server is None
                    or not hasattr(tv, "catalog_changed_under") or tv.ddl_running):
                continue
            if tv.in_block or tv.wrapped or client.expect:
                tv.catalog_changed_under(old)
            if client.expect:
                waiting.append((client, client.server, tv.txn))
        return waiting

    async def _quiesce(self, database: str, waiting: list[tuple[Any, Any, int]]) -> None:
        """Until every request sent under the old catalog has been answered: an autocommit
        write to a newly tracked table sent before the reload commits unrefreshed, so the
        creator's diff refresh must come after it (bounded, then a warning)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUIESCE_TIMEOUT
        while True:
            waiting = [(c, srv, txn) for c, srv, txn in waiting
                       if not c.closed and c.server is srv and c.expect and c.tview.txn == txn]
            if not waiting:
                return
            if loop.time() >= deadline:
                log.warning("tview catalog change: requests sent under the old catalog still"
                            " running; acknowledging anyway", database=database,
                            clients=[c.id for c, _, _ in waiting])
                return
            await asyncio.sleep(0.002)

    async def _acknowledge(self, database: str, generation: int) -> None:
        async with self._lock(database):
            conn = self._listeners.get(database)
            if conn is None or generation <= self._acked.get(database, -1):
                return
            try:
                await conn.execute("SELECT pg_catalog.set_config('application_name', $1, false)",
                                   listener_name(self.engine.cfg.schema, generation))
            except Exception as exc:  # noqa: BLE001 - the listener is lost: it reconnects
                log.warning("tview catalog acknowledgement failed", database=database,
                            error=str(exc))
                return
            self._acked[database] = generation

    async def after_ddl(self, database: str, created: tuple[str, ...] = (),
                        tview_ddl: bool = False) -> tuple[str, ...]:
        """After a COMMIT that ran DDL: reload and announce; after TVIEW DDL also wait until
        every instance loaded it and diff-refresh the TVIEWs ``created`` (ddl.sync_catalog).
        Returns warnings for the client."""
        await self.reload(database, announce=True)
        if not tview_ddl and not created:
            return ()
        cfg = self.engine.cfg
        try:
            conn = await self.engine._connect(database)
            try:
                return await sync_catalog(conn, cfg.schema, cfg.lock_namespace, created)
            finally:
                await conn.close()
        except Exception as exc:  # noqa: BLE001 - committed already: say what is left to do
            log.warning("tview catalog sync failed", database=database, error=str(exc))
            return (f"TVIEW catalog change committed, but the repair after it failed ({exc}):"
                    f" run `tvproxy tview refresh`",)

    async def close(self) -> None:
        self._closing = True
        for task in [*self._relisten.values(), *self._tasks]:
            task.cancel()
        for conn in list(self._listeners.values()):
            if conn is not None:
                await conn.close()
