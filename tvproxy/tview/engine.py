"""The glue between sessions and the pure TVIEW layers: catalogs per database, the per-client
hooks (session/hooks.py) that track keys and inject refresh plans, and the statistics.

Where keys are recorded: :meth:`TviewSession.query` / :meth:`TviewSession.bind`.  Where a plan is
injected: before a COMMIT (``query``) and at the end of implicit transactions
(:meth:`TviewSession.ready`: the proxy opened the block with BEGIN and closes it with
plan + COMMIT in one round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tvproxy.log import debug_enabled, get_logger
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D
from tvproxy.tview.analyze import CreateTview, DropTviews, TviewError, parse_tview_ddl
from tvproxy.tview.conversation import Reply, ServerConversation, ServerError, row_description
from tvproxy.tview.follow import CatalogFollower
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.opaque import opaque_condition, reject_sql
from tvproxy.tview.planner import ALL_KEYS, KeysWhen, RefreshPlan, plan_refresh, statement_name
from tvproxy.tview.returning_hooks import ReturningHooks
from tvproxy.tview.session_capture import (
    EMPTY,
    Audit,
    CaptureHooks,
    CatalogMap,
    Closing,
    Prepared,
    all_affected,
)
from tvproxy.tview.statement import Kind
from tvproxy.tview.tracker import TransactionTracker
from tvproxy.tview.twophase import catch_up
from tvproxy.tview.txcontrol import TxKind

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession

log = get_logger("tvproxy.tview")
_COMMITS = (TxKind.COMMIT, TxKind.COMMIT_AND_CHAIN, TxKind.PREPARE)


@dataclass
class EntityStats:
    commits: int = 0
    keys_enqueued: int = 0
    keys_coalesced: int = 0
    rows_refreshed: int = 0
    rows_deleted: int = 0
    opaque_writes: int = 0  # transactions whose unattributed writes refreshed this fully
    cascade_rows: int = 0
    full_refreshes: int = 0
    refresh_statements: int = 0
    errors: int = 0
    total_refresh_us: int = 0
    max_refresh_us: int = 0
    last_refresh_at: float = 0.0


MAX_ENGINE_STATEMENTS = 512  # refresh statements kept prepared per server


def plan_messages(plan: RefreshPlan, server: Any = None) -> tuple[bytes, tuple[bytes, ...]]:
    """The plan as extended-protocol messages, keys bound as text array parameters.  Its
    statements are prepared once per server (named by their text's digest) and then only
    bound: planning them again on every COMMIT would cost more than running them.  Returns
    the names newly prepared (forgotten again if the batch fails)."""
    known: set[bytes] = server.engine_statements if server is not None else set()
    out = []
    new: list[bytes] = []
    names = plan.names or tuple(statement_name(sql) for sql in plan.statements)
    texts: dict[int, bytes | None] = {}  # a key list bound by several statements: one text
    for sql, params, digest in zip(plan.statements, plan.params, names, strict=True):
        name = b""
        if server is not None:
            name = digest
            if name not in known:
                if len(known) < MAX_ENGINE_STATEMENTS:
                    # Close first: a batch that failed may or may not have prepared it
                    out.append(B.close_statement(name) + B.parse(name, sql.encode()))
                    known.add(name)
                    new.append(name)
                else:
                    name = b""
        if not name:
            out.append(B.parse(b"", sql.encode()))
        values = []
        for p in params:
            v = texts.get(id(p))
            if v is None:
                v = texts[id(p)] = B.text_value(p)
            values.append(v)
        out.append(B.bind(name, values))
        out.append(B.EXECUTE)
    return b"".join(out), tuple(new)


@dataclass(frozen=True)
class _Talk:
    """A statement of the engine's conversation on the client's server (TVIEW DDL)."""

    future: asyncio.Future[Reply]


class TviewEngine:
    """One per proxy: catalogs of every database, statistics, catalog reloads (kept coherent
    with the other instances by ``follow``: tview/follow.py)."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        # assigning a catalog updates what sessions see of it (session_capture.TviewDatabase)
        self.catalogs: dict[str, RuntimeCatalog] = CatalogMap()
        self.load_timeout = 10.0
        self.stats: dict[tuple[str, str], EntityStats] = {}
        self.commits = 0
        self.commit_overhead_us = 0
        self.follow = CatalogFollower(self)
        self.loaded = asyncio.Event()  # clients log in once catalogs are known (no blind writes)

    @property
    def cfg(self) -> Any:
        return self.proxy.cfg.tview

    async def _connect(self, database: str, application_name: str | None = None) -> Any:
        import asyncpg

        db = self.proxy.cfg.databases[database]
        settings = {"application_name": application_name} if application_name else None
        return await asyncpg.connect(host=db.host, port=db.port, user=db.user or "postgres",
                                     password=db.password or None, timeout=5,
                                     database=db.dbname or database, server_settings=settings)

    async def start(self) -> None:
        for name in list(self.proxy.cfg.databases):
            await self.follow.start(name)
        self.loaded.set()
        # catalogs also follow what changed without a NOTIFY (functions, triggers, foreign
        # keys created directly on the server)
        await self._recover()
        while self.cfg.recovery_interval > 0:
            await asyncio.sleep(self.cfg.recovery_interval)
            for name in list(self.proxy.cfg.databases):
                if not self.follow.listening(name):  # a database added by a config reload
                    await self.follow.start(name)
                elif not self.catalog(name).empty:
                    await self.reload(name)
            await self._recover()

    async def _recover(self) -> None:
        """Catch up prepared transactions committed without the proxy seeing it."""
        for name, cat in list(self.catalogs.items()):
            if not cat.empty:
                await self.catch_up(name)

    async def catch_up(self, database: str, gid: str | None = None) -> None:
        cat = self.catalog(database)
        if cat.empty:
            return
        cfg = self.cfg
        try:
            conn = await self._connect(database)
            try:
                done = await catch_up(conn, cat, cfg.schema, database, cfg.lock_namespace,
                                      cfg.max_propagation_depth, gid)
            finally:
                await conn.close()
            if done:
                log.info("tview 2pc catch-up", database=database, gids=done)
        except Exception as exc:  # noqa: BLE001 - the next recovery pass tries again
            log.warning("tview 2pc catch-up failed", database=database, error=str(exc))

    async def reload(self, database: str, announce: bool = False) -> None:
        """Load the catalog of ``database`` again (``announce``: tell other instances too)."""
        await self.follow.reload(database, announce)

    async def after_ddl(self, database: str, created: tuple[str, ...] = (),
                        tview_ddl: bool = False) -> tuple[str, ...]:
        return await self.follow.after_ddl(database, created, tview_ddl)

    async def close(self) -> None:
        await self.follow.close()

    def catalog(self, database: str) -> RuntimeCatalog:
        return self.catalogs.get(database, EMPTY)

    def stat(self, database: str, entity: str) -> EntityStats:
        key = (database, entity)
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = EntityStats()
        return st


class TviewSession(CaptureHooks, ReturningHooks):
    """The hooks of one client: its transaction's keys and what to inject (what statements do:
    tview/session_capture.py; appended RETURNING for writes whose keys the text does not name:
    tview/returning_hooks.py)."""

    # catalog coherence (TviewEngine._catalog_changed, with_new_tviews) and the DDL path
    catalog_before: RuntimeCatalog | None = None  # catalog this transaction's writes saw
    catalog_before_txn = -1  # the transaction (self.txn) catalog_before belongs to
    ddl_running = False  # the engine is running TVIEW DDL on this client's server
    ddl_in_block = False  # TVIEW DDL ran in the open transaction block
    ddl_created: tuple[str, ...] = ()  # TVIEWs created in it

    def __init__(self, engine: TviewEngine, client: ClientSession) -> None:
        self.engine = engine
        self.client = client
        self.db = engine.catalogs.database(client.database)  # type: ignore[attr-defined]
        self.cat: RuntimeCatalog | None = None  # the catalog this session follows
        self.tracker = TransactionTracker()
        self.in_block = False
        self.wrapped = False
        self.implicit = False  # wrapped, still in PostgreSQL's implicit transaction of a batch
        self.convert_query = False  # the Query just seen runs as an extended statement
        self.hold = True  # hold the client's input after a statement in a wrapped transaction
        # prepared statements that concern the engine (see parse)
        self.stmts: dict[bytes, Prepared] = {}
        self.inflight: list[object] = []
        self.started = 0.0
        self.failed = False  # the server said the transaction is aborted
        # opaque-writes audit: allowance per table of the open span (-1: any), comparisons
        # whose answers are still on their way, tables found this transaction
        self.span: dict[str, int] | None = None
        self.audits_inflight = 0
        self.opaque_tables: list[str] = []
        self.reload_after = False
        self.committed_prepared: list[str] = []  # COMMIT PREPARED gids to catch up after
        self.flushed: set[str] = set()  # entities read-your-writes refreshed in this transaction
        self.txn = 0
        self._init_returning()

    # --- DDL --------------------------------------------------------------------------------

    def ddl(self, client: ClientSession, text: bytes) -> bool:
        """``CREATE TABLE tv_x AS SELECT`` / ``DROP TABLE tv_x``: run by the engine, answered
        by the proxy (True), or not TVIEW DDL (False)."""
        if b";" in text and b";" in text.rstrip().rstrip(b";") \
                and self._commit_after_writes(client, text):  # more than a closing ';'
            return True
        head = text[:64].lstrip().lower()
        if b"tv_" not in text or not head.startswith((b"create", b"drop")):
            return False
        try:
            stmt = parse_tview_ddl(text.decode("utf-8", "replace"))
        except TviewError as exc:
            _answer_soon(client, B.error_response(exc.sqlstate, exc.message)
                         + B.ready_for_query(b"T" if self.in_block else b"I"))
            return True
        if stmt is None:
            return False
        asyncio.ensure_future(self._run_ddl(client, stmt))
        return True

    def _commit_after_writes(self, client: ClientSession, text: bytes) -> bool:
        """A multi-statement Query that writes tracked tables and then commits: the refresh
        would have to run in the middle of it.  Refused (0A000) rather than left stale."""
        low = text.lower()
        if not any(w in low for w in (b"commit", b"end", b"prepare")):
            return False
        if not self.db.active:
            return False
        st = self.db.analyzer.analyze(text.decode("utf-8", "replace"))
        cmds = st.commands
        ends = [i for i, c in enumerate(cmds) if c is not None and c.kind in _COMMITS]
        if not ends or None not in cmds[:ends[-1]]:
            return False
        if not st.kind & (Kind.WRITE | Kind.OPAQUE):
            return False
        _answer_soon(client, B.error_response(
            "0A000", "tvproxy: a query string that writes TVIEW source tables cannot also "
            "COMMIT or PREPARE TRANSACTION", hint="send COMMIT as a query of its own")
            + B.ready_for_query(b"T" if self.in_block else b"I"))
        return True

    async def _run_ddl(self, client: ClientSession, stmt: CreateTview | DropTviews) -> None:
        """On the client's own server, so its search_path and other settings resolve the
        names: inside a transaction block in the client's transaction (every instance loads
        it after the client's COMMIT: hold_ready); outside one in transactions the proxy opens
        and commits itself, and the client hears of it once every instance maintains it."""
        engine = self.engine
        in_block = self.in_block
        conn = ServerConversation(lambda batch: self._talk(client, batch), in_block=in_block)
        self.ddl_running = True
        try:
            out, ok = await self._ddl_on(conn, stmt)
            if in_block:
                if ok:
                    self.reload_after = True  # seen by everyone once the client commits
                    self.ddl_in_block = True
                    if isinstance(stmt, CreateTview):
                        self.ddl_created += (stmt.entity,)
                    status = b"T"
                else:
                    status = b"E"
                    with contextlib.suppress(ServerError):  # abort it, as PostgreSQL's DDL would
                        await conn.execute("DO $$BEGIN RAISE EXCEPTION 'tvproxy: TVIEW DDL "
                                           "failed'; END$$")
            else:
                status = b"I"
                if ok:  # the listener has loaded it already, unless it is down
                    await engine.reload(client.database)
        finally:
            self.ddl_running = False
        client.ddl_done(out + B.ready_for_query(status))

    def take_ddl(self) -> tuple[bool, tuple[str, ...]]:
        """At the end of the block: whether TVIEW DDL ran in it, and the TVIEWs it created."""
        done = (self.ddl_in_block, self.ddl_created)
        self.ddl_in_block, self.ddl_created = False, ()
        return done

    async def _ddl_on(self, conn: Any, stmt: CreateTview | DropTviews) -> tuple[bytes, bool]:
        from tvproxy.tview.ddl import create_tview, drop_tviews

        cfg = self.engine.cfg
        try:
            if isinstance(stmt, CreateTview):
                res = await create_tview(conn, stmt, cfg.schema, cfg.lock_namespace)
                out = _warnings(res.warnings)
                return out + B.command_complete(f"SELECT {res.rows}"), True
            warnings: list[str] = []
            await drop_tviews(conn, stmt, cfg.schema, warnings)
            return _warnings(warnings) + B.command_complete("DROP TABLE"), True
        except TviewError as exc:
            return B.error_response(exc.sqlstate, exc.message), False
        except Exception as exc:  # noqa: BLE001 - the server's own error, as it said it
            sqlstate = getattr(exc, "sqlstate", None) or "XX000"
            return B.error_response(sqlstate, str(exc)), False

    def catalog_changed_under(self, old: RuntimeCatalog) -> None:
        """The engine loaded another catalog while this transaction was open: the writes it
        made so far were captured under ``old`` (called by TviewEngine._catalog_changed)."""
        if self.catalog_before is None or self.catalog_before_txn != self.txn:
            self.catalog_before = old
            self.catalog_before_txn = self.txn

    def with_new_tviews(self, cat: RuntimeCatalog,
                        keys: dict[str, set[Hashable]]) -> dict[str, set[Hashable]]:
        """The keys to refresh at this transaction's COMMIT (or PREPARE, or the end of an
        implicit one): when TVIEWs were created since it began, what it wrote before the
        reload was not tracked for them, so they are refreshed whole (a diff refresh)."""
        old = self.catalog_before
        if old is None:
            return keys
        self.catalog_before = None
        if self.catalog_before_txn != self.txn:
            return keys
        new = [e for e, entry in cat.entries.items() if old.entries.get(e) != entry]
        if not new:
            return keys
        keys = {e: set(v) for e, v in keys.items()}
        for e in new:
            keys.setdefault(e, set()).add(ALL_KEYS)
        log.info("tview catalog changed during a transaction: refreshing new TVIEWs whole",
                 client=self.client.id, database=self.client.database, tviews=new)
        return keys

    async def _talk(self, client: ClientSession, batch: bytes) -> Reply:
        """One statement of the engine on the client's server (the client is held)."""
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.inflight.append(_Talk(fut))
        if not client.inject_now(batch):
            self.inflight.pop()
            raise ServerError({"C": "08006", "M": "tvproxy: no server linked"})
        return await fut

    # --- ends of transactions --------------------------------------------------------------

    def _plan(self, cat: RuntimeCatalog, keys: dict[str, set[Hashable]]) -> RefreshPlan | None:
        if not keys:
            return None
        cfg = self.engine.cfg
        try:
            plan = plan_refresh(cat.specs, cat.order, keys, cat.key_types, cfg.lock_namespace,
                                cfg.max_propagation_depth, cat.all_keys, cat.derived,
                                cat.fk_sources, cache=cat.plans)
        except TviewError as exc:  # 54001: fail the COMMIT with it
            return RefreshPlan((), (f"DO $$BEGIN RAISE EXCEPTION USING ERRCODE = "
                                    f"'{exc.sqlstate}', MESSAGE = "
                                    f"{_sql_literal(exc.message)}; END$$",), ((),))
        if plan is not None:
            db = self.client.database
            st = self.engine.stat(db, "*")
            st.keys_enqueued += sum(len(v) for v in keys.values())
            for entity, n in self.tracker.taken_touches.items():
                coalesced = n - len(keys.get(entity, ()))
                if coalesced > 0:  # written again after it was queued: refreshed once
                    st.keys_coalesced += coalesced
                    if entity in cat.specs:
                        self.engine.stat(db, entity).keys_coalesced += coalesced
        return plan

    def _plan_batch(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog,
                    keys: dict[str, set[Hashable]], flush: bool) -> None:
        """The refresh plan for ``keys`` as one batch; while an audit's answer is on its way,
        the plan itself reads which tables had opaque writes."""
        waiting = self.audits_inflight > 0
        if waiting:
            keys = {e: set(v) for e, v in keys.items()}
            for name, entity in cat.audited.items():
                marker = KeysWhen(opaque_condition(name))
                for e in all_affected(cat, entity):
                    keys.setdefault(e, set()).add(marker)
        plan = self._plan(cat, keys)
        if self.engine.cfg.opaque_writes == "reject" and (waiting or self.opaque_tables):
            check = reject_sql()
            plan = RefreshPlan((), (check,), ((),)) if plan is None else RefreshPlan(
                plan.entities, (check, *plan.statements), ((), *plan.params),
                plan.first_refresh + 1, (statement_name(check), *plan.names), plan.full)
        if not flush and self.flushed:  # read-your-writes refreshed these before
            if plan is None:
                self._count_commit(list(self.flushed), total=True)
            else:
                self._count_commit([e for e in self.flushed if e not in plan.entities])
        if plan is not None:
            msgs, new = plan_messages(plan, self.client.server)
            pre.append((msgs + B.SYNC, (plan, time.monotonic(), flush, new)))

    def _count_commit(self, entities: list[str], total: bool = False) -> None:
        """Commits refreshing each entity count once per transaction, whether the COMMIT's
        plan or read-your-writes flushes before it did the work."""
        db = self.client.database
        if total:
            self.engine.commits += 1
            self.engine.stat(db, "*").commits += 1
        for e in entities:
            self.engine.stat(db, e).commits += 1

    def _end_transaction(self) -> None:
        self.tracker.reset()
        self.started = 0.0
        self.span = None
        self.opaque_tables = []
        self.failed = False
        self.flushed = set()
        self.implicit = False
        self.txn += 1

    def ready(self, client: ClientSession, status: bytes) -> list[bytes] | None:
        """ReadyForQuery for the client with nothing outstanding: close a transaction the
        proxy opened (plan + COMMIT, or ROLLBACK), else follow the server's status."""
        if self.wrapped:
            self.wrapped = False
            if status == b"T":
                cat = self.engine.catalog(client.database)
                pre: list[tuple[bytes, object]] = []
                self._close_span(pre, cat)
                self._plan_batch(pre, cat, self.with_new_tviews(cat, self.tracker.take()), False)
                self._end_transaction()
                pre.append((B.query("COMMIT"), None))
                return self._send(pre)
            self._end_transaction()
            return self._send([(B.query("ROLLBACK"), None)])
        if status == b"I":
            self.in_block = False
            self._end_transaction()
        else:
            self.in_block = True
            self.failed = status == b"E"
        return None

    def hold_ready(self, client: ClientSession, status: bytes) -> bool:
        """After DDL that may add triggers, functions or cascading keys: the client hears
        ReadyForQuery once the catalog knows them (its next statement is audited right)."""
        if status != b"I" or not (self.reload_after or self.committed_prepared):
            return False
        reload, self.reload_after = self.reload_after, False
        gids, self.committed_prepared = self.committed_prepared, []
        asyncio.ensure_future(self._then_ready(client, status, reload, gids))
        return True

    async def _then_ready(self, client: ClientSession, status: bytes, reload: bool,
                          gids: list[str]) -> None:
        """Reload the catalog and/or catch up committed prepared transactions, then answer."""
        warnings: tuple[str, ...] = ()
        try:
            if reload:
                tview_ddl, created = self.take_ddl()
                warnings = await self.engine.after_ddl(client.database, created, tview_ddl)
            for gid in gids:
                await self.engine.catch_up(client.database, gid)
        finally:
            client.ddl_done(_warnings(warnings) + B.ready_for_query(status))

    def injected(self, raw: list[bytes], error: dict[str, str] | None) -> bool:
        """Replies of an injected batch (``raw``: the bodies of its DataRows, decoded here only
        where read): refresh counts for the statistics, keys found by pre-images and audits.
        True: the batch's error is not the client's concern."""
        if not self.inflight:
            return False
        meta = self.inflight.pop(0)
        if isinstance(meta, Closing):  # the plan closing an implicit transaction (close_now)
            if error is not None and error.get("C") == "25P02":  # the client's statement failed
                if meta.meta is not None:
                    new = meta.meta[3]  # type: ignore[index]
                    if new and self.client.server is not None:
                        self.client.server.engine_statements.difference_update(new)
                return True
            meta = meta.meta
        if isinstance(meta, _Talk):
            rows = [D.data_row(r) for r in raw]
            client = self.client
            cols = row_description(client.inject_desc) if client.inject_desc else []
            tag = client.inject_tag.decode() if client.inject_tag else ""
            if not meta.future.done():
                meta.future.set_result(Reply(cols, rows, tag, error))
            return True  # the conversation reports its errors itself
        if isinstance(meta, Audit):
            if meta.close:
                self.audits_inflight -= 1
                if error is None and meta.txn == self.txn:
                    rows = [D.data_row(r) for r in raw]
                    found = [meta.tables[int(r[0]) - 1] for r in rows if r and r[0] is not None]
                    if found:
                        self._opaque_found(self.engine.catalog(self.client.database), found)
            return True  # a baseline or comparison in an aborted transaction: nothing to do
        if isinstance(meta, str):  # a pre-image: the parents of the children written next
            if error is None:
                integer = self.engine.catalog(self.client.database).key_types.get(meta) in (
                    "bigint", "integer", "smallint")
                rows = [D.data_row(r) for r in raw]
                vals = [r[0].decode() for r in rows if r and r[0] is not None]
                self.tracker.touch(meta, [int(v) for v in vals] if integer else vals)
                self.tracker.statement_succeeded()
            return False
        if meta is None:
            return False
        plan, started, flush, new = meta  # type: ignore[misc]
        if error is not None and new and self.client.server is not None:
            self.client.server.engine_statements.difference_update(new)  # never prepared
        if not plan.entities:
            return False
        db = self.client.database
        elapsed = int((time.monotonic() - started) * 1e6)
        total = self.engine.stat(db, "*")
        if error is not None:
            total.errors += 1
            return False
        if flush:
            self.flushed.update(plan.entities)
        else:
            self._count_commit([], total=True)
        # rows: one per statement; each refresh gives (keys, upserted, deleted, cascaded)
        first = plan.first_refresh
        refreshed = [D.data_row(r) for r in raw[first:first + len(plan.entities)]]
        counts: list[int] = []
        now = time.time()
        for i, entity in enumerate(plan.entities):
            st = self.engine.stat(db, entity)
            st.commits += 0 if flush else 1
            st.refresh_statements += 1
            row = refreshed[i] if i < len(refreshed) else []
            keys, up, dele, cascaded = (int(v or 0) for v in (*row, 0, 0, 0, 0)[:4])
            counts.append(keys)
            st.keys_enqueued += keys
            st.rows_refreshed += up
            st.rows_deleted += dele
            st.cascade_rows += cascaded
            total.rows_refreshed += up
            total.rows_deleted += dele
            total.cascade_rows += cascaded
            if entity in plan.full:
                st.full_refreshes += 1
                total.full_refreshes += 1
            st.total_refresh_us += elapsed
            st.max_refresh_us = max(st.max_refresh_us, elapsed)
            st.last_refresh_at = now
            total.refresh_statements += 1
        total.total_refresh_us += elapsed
        total.max_refresh_us = max(total.max_refresh_us, elapsed)
        total.last_refresh_at = now
        if debug_enabled():
            log.debug("tview refresh", client=self.client.id, database=db,
                      entities=list(plan.entities), keys=counts,
                      statements=len(plan.statements), ms=round(elapsed / 1000, 3))
        return False


def _warnings(texts: tuple[str, ...] | list[str]) -> bytes:
    return b"".join(B.notice_response(w, "01000", "WARNING") for w in texts)


def _answer_soon(client: ClientSession, replies: bytes) -> None:
    """Answer a Query the engine took over, once the session has finished reading it."""
    asyncio.get_running_loop().call_soon(client.ddl_done, replies)


def _sql_literal(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

