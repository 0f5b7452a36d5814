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
import hashlib
import re
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pglast

from tvproxy.log import get_logger
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D
from tvproxy.tview.analyze import CreateTview, DropTviews, TviewError, parse_tview_ddl
from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.capture import WriteCapture, capture
from tvproxy.tview.conversation import Reply, ServerConversation, ServerError, row_description
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.opaque import (
    baseline_sql,
    close_sql,
    is_opaque,
    opaque_condition,
    reject_sql,
)
from tvproxy.tview.planner import ALL_KEYS, KeysWhen, RefreshPlan, plan_refresh
from tvproxy.tview.returning_hooks import ReturningHooks
from tvproxy.tview.tracker import TransactionTracker
from tvproxy.tview.twophase import PERSISTED, catch_up, encode_keys, insert_sql
from tvproxy.tview.txcontrol import TxKind, classify

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession

log = get_logger("tvproxy.tview")
EMPTY = RuntimeCatalog()
_ROLLBACKS = (TxKind.ROLLBACK, TxKind.ROLLBACK_AND_CHAIN, TxKind.ROLLBACK_TO)
_COMMITS = (TxKind.COMMIT, TxKind.COMMIT_AND_CHAIN, TxKind.PREPARE)
# DDL after which the audit's catalog may be out of date (triggers, functions, foreign keys)
_DDL = re.compile(r"(?:^|;)\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*(?:create|alter|drop)\s+"
                  r"(?:or\s+replace\s+)?(?:constraint\s+)?(?:function|procedure|trigger|table)\b",
                  re.I | re.S)


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
    for sql, params in zip(plan.statements, plan.params, strict=True):
        name = b""
        if server is not None:
            name = b"tvproxy_" + hashlib.sha1(sql.encode()).hexdigest()[:20].encode()
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
        out.append(_bind(name, params))
        out.append(B.execute())
    return b"".join(out), tuple(new)


def _bind(statement: bytes, params: tuple[object, ...] | list[object]) -> bytes:
    return B.bind(statement, [B.text_value(p) for p in params])


def statement_messages(statements: tuple[str, ...] | list[str],
                       all_params: tuple[tuple[object, ...], ...] | list[tuple[object, ...]]
                       ) -> bytes:
    """Unnamed Parse/Bind/Execute per statement (no Sync), text parameters."""
    out = []
    for sql, params in zip(statements, all_params, strict=True):
        out.append(B.parse(b"", sql.encode()))
        out.append(_bind(b"", params))
        out.append(B.execute())
    return b"".join(out)


def _decode_param(value: bytes | None, fmt: int, pk_type: str) -> Hashable | None:
    if value is None:
        return None
    if fmt == 0:
        text = value.decode()
        return int(text) if pk_type in ("bigint", "integer", "smallint") else text
    if len(value) == 16 and pk_type == "uuid":
        return str(uuid.UUID(bytes=value))
    if pk_type in ("bigint", "integer", "smallint") and len(value) in (2, 4, 8):
        return int.from_bytes(value, "big", signed=True)
    if pk_type == "text" or pk_type.startswith("character"):
        return value.decode()
    return None


@dataclass(frozen=True)
class _Audit:
    """An injected batch of the opaque-writes audit (tview/opaque.py)."""

    tables: tuple[str, ...] = ()  # for a comparison: the tables, in the order sent
    close: bool = False
    txn: int = 0  # the client's transaction it belongs to


@dataclass(frozen=True)
class _Prepared:
    sql: str
    writes: tuple[WriteCapture, ...]
    opaque: bool
    deferred: bool  # named: effects at every Bind, not at the Parse


@dataclass(frozen=True)
class _Talk:
    """A statement of the engine's conversation on the client's server (TVIEW DDL)."""

    future: asyncio.Future[Reply]


class TviewEngine:
    """One per proxy: catalogs of every database, statistics, catalog reloads."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.catalogs: dict[str, RuntimeCatalog] = {}
        self.load_timeout = 10.0
        self.stats: dict[tuple[str, str], EntityStats] = {}
        self.commits = 0
        self.commit_overhead_us = 0
        self._listeners: dict[str, Any] = {}
        self.loaded = asyncio.Event()  # clients log in once catalogs are known (no blind writes)

    @property
    def cfg(self) -> Any:
        return self.proxy.cfg.tview

    async def _connect(self, database: str) -> Any:
        import asyncpg

        db = self.proxy.cfg.databases[database]
        return await asyncpg.connect(host=db.host, port=db.port, user=db.user or "postgres",
                                     password=db.password or None, timeout=5,
                                     database=db.dbname or database)

    async def start(self) -> None:
        for name in list(self.proxy.cfg.databases):
            await self.reload(name)
        self.loaded.set()
        # catalogs also follow what changed without a NOTIFY (functions, triggers, foreign
        # keys created directly on the server)
        await self._recover()
        while self.cfg.recovery_interval > 0:
            await asyncio.sleep(self.cfg.recovery_interval)
            for name, cat in list(self.catalogs.items()):
                if not cat.empty:
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

    async def _listen(self, database: str) -> None:
        """Follow catalog changes of other instances (only where TVIEWs exist: a database
        without them costs no backend)."""
        if database in self._listeners:
            return
        self._listeners[database] = None
        try:
            conn = await self._connect(database)
            await conn.add_listener(
                f"{self.cfg.schema}_catalog",
                lambda *_a, db=database: asyncio.ensure_future(self.reload(db)))
            self._listeners[database] = conn
        except Exception as exc:  # noqa: BLE001 - a database may be down
            del self._listeners[database]
            log.warning("tview catalog listener failed", database=database, error=str(exc))

    async def reload(self, database: str, announce: bool = False) -> None:
        """Load the catalog of ``database`` again (``announce``: tell other instances too)."""
        from tvproxy.tview.ddl import load_runtime

        try:
            conn = await self._connect(database)
            try:
                self.catalogs[database] = cat = await load_runtime(conn, self.cfg.schema)
                if announce:
                    await conn.execute(f"NOTIFY {q(self.cfg.schema + '_catalog')}")
            finally:
                await conn.close()
            if not cat.empty:
                await self._listen(database)
                if not cat.track_counts:
                    log.warning("track_counts is off: writes through functions, triggers, CALL"
                                " or DO cannot be audited", database=database)
        except Exception as exc:  # noqa: BLE001 - keep the old catalog, say why
            log.warning("tview catalog load failed", database=database, error=str(exc))

    async def close(self) -> None:
        for conn in self._listeners.values():
            if conn is not None:
                await conn.close()

    def catalog(self, database: str) -> RuntimeCatalog:
        return self.catalogs.get(database, EMPTY)

    def stat(self, database: str, entity: str) -> EntityStats:
        key = (database, entity)
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = EntityStats()
        return st


class TviewSession(ReturningHooks):
    """The hooks of one client: its transaction's keys and what to inject (appended RETURNING
    for writes whose keys the text does not name: tview/returning_hooks.py)."""

    def __init__(self, engine: TviewEngine, client: ClientSession) -> None:
        self.engine = engine
        self.client = client
        self.tracker = TransactionTracker()
        self.in_block = False
        self.wrapped = False
        self.hold = True  # hold the client's input after a statement in a wrapped transaction
        # prepared statements that concern the engine (see parse)
        self.stmts: dict[bytes, _Prepared] = {}
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

    # --- recording keys --------------------------------------------------------------------

    def _touch(self, cat: RuntimeCatalog, w: WriteCapture, keys: list[Hashable] | None,
               pre: list[tuple[bytes, object]]) -> None:
        tracker = self.tracker
        tracker.touch(w.entity, keys if keys is not None else [ALL_KEYS])
        if self.span is not None:  # what the counters may show for this captured write
            name = cat.audit_name.get(w.table, w.table)
            n = -1 if keys is None or self.span.get(name, 0) < 0 else len(keys)
            self.span[name] = -1 if n < 0 else self.span.get(name, 0) + n
        # an upsert's DO UPDATE moves children too
        old_values_needed = w.op not in ("insert", "update") or w.assigns_key_columns
        parents = cat.aggregated_into.get(w.entity, ())
        if parents and old_values_needed:
            if keys is None:
                for parent in parents:
                    tracker.touch(parent, [ALL_KEYS])
            else:  # the children's parents before the statement changes them
                for parent, sql in cat.preimage.get(w.entity, ()):
                    pre.append((_preimage_batch(sql, keys), parent))
        for e in cat.full_on.get(w.entity, ()):
            tracker.touch(e, [ALL_KEYS])
        if w.assigns_pk and keys is not None:
            tracker.touch(w.entity, [ALL_KEYS])  # the new pk is not in the statement
        # keys count from the moment the statement is sent: a statement that fails costs at
        # most a refresh that finds nothing changed
        tracker.statement_succeeded()
        if not self.started:
            self.started = time.monotonic()

    def _wrap(self, pre: list[tuple[bytes, object]]) -> None:
        if not self.in_block and not self.wrapped:
            self.wrapped = True
            pre.insert(0, (B.query("BEGIN"), None))

    def _send(self, pre: list[tuple[bytes, object]]) -> list[bytes] | None:
        """Batches to run, in order; what each one is for waits in ``inflight``."""
        if not pre:
            return None
        self.inflight.extend(meta for _, meta in pre)
        return [batch for batch, _ in pre]

    def _tx_commands(self, sql: str, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        for cmd in classify(sql):
            if cmd is None:
                continue
            kind = cmd.kind
            if kind is TxKind.BEGIN:
                self.in_block = True
            elif kind in (TxKind.COMMIT, TxKind.COMMIT_AND_CHAIN, TxKind.PREPARE):
                if not self.failed:  # COMMIT of a failed transaction refreshes nothing
                    self._close_span(pre, cat)
                    keys = self.tracker.take()
                    self._plan_batch(pre, cat, keys, False)
                    if kind is TxKind.PREPARE and cmd.name and (keys or self.audits_inflight):
                        self._persist_queue(pre, cat, cmd.name, keys)
                self._end_transaction()
                self.in_block = kind is TxKind.COMMIT_AND_CHAIN
            elif kind in (TxKind.ROLLBACK, TxKind.ROLLBACK_AND_CHAIN):
                self._end_transaction()
                self.in_block = kind is TxKind.ROLLBACK_AND_CHAIN
            elif kind is TxKind.COMMIT_PREPARED and cmd.name:
                self.committed_prepared.append(cmd.name)
            elif kind is TxKind.SAVEPOINT and cmd.name:
                self.tracker.savepoint(cmd.name)
            elif kind is TxKind.RELEASE and cmd.name:
                self.tracker.release(cmd.name)
            elif kind is TxKind.ROLLBACK_TO and cmd.name:
                self.tracker.rollback_to(cmd.name)
                self.span = None  # it opened after the last SAVEPOINT: all of it is undone
                self.failed = False

    def _read_your_writes(self, sql: str, pre: list[tuple[bytes, object]],
                          cat: RuntimeCatalog) -> None:
        if not self.engine.cfg.read_your_writes or not self.in_block and not self.wrapped:
            return
        low = sql.lower()
        if not any(t in low for t in cat.tv_tables):
            return
        self._close_span(pre, cat)
        if not self.tracker.pending() and not self.audits_inflight:
            return
        self._plan_batch(pre, cat, self.tracker.flush(), True)

    def _persist_queue(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog, gid: str,
                       keys: dict[str, set[Hashable]]) -> None:
        """PREPARE TRANSACTION: the queue goes into pending_refresh, in the same transaction,
        for the catch-up after COMMIT PREPARED (tview/twophase.py)."""
        everything = [e for ent in cat.audited.values() for e in _all_affected(cat, ent)] if (
            self.audits_inflight) else []
        params = (gid, self.client.database, encode_keys(keys, everything))
        PERSISTED.record(*params)  # the keys SHOW TVIEW PENDING gives while it is prepared
        pre.append((statement_messages([insert_sql(self.engine.cfg.schema)], [params]) + B.SYNC,
                    None))

    # --- opaque writers ---------------------------------------------------------------------

    def _audit(self, sql: str, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> bool:
        """Open an audit span before an opaque statement, close it before any other one."""
        if not cat.audited or self.failed:
            return False
        if is_opaque(sql, cat.functions, cat.trigger_tables):
            self._open_span(pre, cat)
            return True
        if self.span is not None and any(
                c is not None and c.kind in _ROLLBACKS for c in classify(sql)):
            self.span = None  # undone with the transaction or savepoint: nothing to compare
        self._close_span(pre, cat)
        return False

    def _open_span(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        if self.span is not None:
            return
        self.span = {}
        names = list(cat.audited)
        pre.append((statement_messages([baseline_sql()], [(names,)]) + B.SYNC, _Audit()))
        if not self.started:
            self.started = time.monotonic()

    def _close_span(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        span = self.span
        if span is None:
            return
        self.span = None
        names = tuple(cat.audited)
        allow = [span.get(n, 0) for n in names]
        pre.append((statement_messages([close_sql()], [(list(names), allow)]) + B.SYNC,
                    _Audit(names, True, self.txn)))
        self.audits_inflight += 1

    def _opaque_found(self, cat: RuntimeCatalog, tables: list[str]) -> None:
        """The comparison's answer: these tables were written behind the statements' backs."""
        for name in tables:
            entity = cat.audited.get(name)
            if entity is None:
                continue
            if name not in self.opaque_tables:
                self.opaque_tables.append(name)
            for e in _all_affected(cat, entity):
                self.tracker.touch(e, [ALL_KEYS])
            self.engine.stat(self.client.database, entity).opaque_writes += 1
        self.tracker.statement_succeeded()
        log.info("tview opaque writes", client=self.client.id, database=self.client.database,
                 tables=tables, policy=self.engine.cfg.opaque_writes)

    def _statement(self, sql: str, pre: list[tuple[bytes, object]],
                   cat: RuntimeCatalog) -> tuple[tuple[WriteCapture, ...], bool]:
        """What every statement text goes through (Query or Parse): flush for reads of tv_
        tables, the opaque-writes audit, transaction control, and the tracked writes it makes
        (with whether it is an opaque writer)."""
        if self.ret_live or self.inflight:  # keys that have not all arrived yet
            self._returning_plan_point(sql, cat)
        self._read_your_writes(sql, pre, cat)
        opaque = self._audit(sql, pre, cat)
        self._tx_commands(sql, pre, cat)
        if opaque:
            self._wrap(pre)  # its writes are compared before the proxy's COMMIT
        if _DDL.search(sql):
            self.reload_after = True  # a new trigger, function or foreign key changes the audit
        try:
            return capture(sql, cat.tracked), opaque
        except pglast.parser.ParseError:
            return (), opaque

    def query(self, client: ClientSession, text: bytes) -> list[bytes] | None:
        """A simple Query: returns the messages to run first (each ending in one
        ReadyForQuery), or None."""
        cat = self.engine.catalog(client.database)
        if cat.empty:
            return None
        pre: list[tuple[bytes, object]] = []
        writes, _opaque = self._statement(text.decode("utf-8", "replace"), pre, cat)
        self.hold = not any(w.op == "copy" for w in writes)  # COPY data must still flow
        rw = self.ret_query = self._returning_rewrite(client, text, writes, cat) if writes \
            else None
        for w in writes:
            if rw is not None:  # keys come back in the appended RETURNING
                self._touch_returning(cat, w, rw)
                continue
            keys = None if w.keys is None or any(k.param is not None for k in w.keys) else [
                k.value for k in w.keys]
            self._touch(cat, w, keys, pre)
        if writes:
            self._wrap(pre)
        return self._send(pre)

    def parse(self, client: ClientSession, name: bytes, text: bytes) -> list[bytes] | None:
        """An unnamed statement runs right after its Parse: its effects happen now.  A named
        one may run many times, on any server: recorded here, its effects happen at each Bind
        (also when the proxy answered the Parse itself)."""
        cat = self.engine.catalog(client.database)
        if cat.empty:
            return None
        sql = text.decode("utf-8", "replace")
        if name:
            if self._matters(sql, cat):
                try:
                    writes = capture(sql, cat.tracked)
                except pglast.parser.ParseError:
                    writes = ()
                opaque = bool(cat.audited) and is_opaque(sql, cat.functions, cat.trigger_tables)
                self.stmts[name] = _Prepared(sql, writes, opaque, True)
            else:
                self.stmts.pop(name, None)
            return None
        pre: list[tuple[bytes, object]] = []
        writes, opaque = self._statement(sql, pre, cat)
        if writes or opaque:
            self.stmts[name] = _Prepared(sql, writes, opaque, False)
            self._wrap(pre)  # before the Parse: a Query in between would drop an unnamed one
        else:
            self.stmts.pop(name, None)
        return self._send(pre)

    def _matters(self, sql: str, cat: RuntimeCatalog) -> bool:
        """Does running this statement concern the engine (transaction control, a tracked or
        opaque write, a read of a tv_ table)?"""
        if any(c is not None for c in classify(sql)):
            return True
        try:
            if capture(sql, cat.tracked):
                return True
        except pglast.parser.ParseError:
            return False
        if cat.audited and is_opaque(sql, cat.functions, cat.trigger_tables):
            return True
        low = sql.lower()
        return any(t in low for t in cat.tv_tables)

    def bind(self, client: ClientSession, name: bytes, body: bytes, pos: int) -> list[bytes] | None:
        prepared = self.stmts.get(name)
        if prepared is None:
            return None
        cat = self.engine.catalog(client.database)
        pre: list[tuple[bytes, object]] = []
        writes, opaque = prepared.writes, prepared.opaque
        if prepared.deferred:  # a named statement: what it does happens now, each time
            writes, opaque = self._statement(prepared.sql, pre, cat)
        elif opaque and not self.failed:
            self._open_span(pre, cat)
        try:
            formats, values = D.bind_params(body, pos)
        except Exception:  # noqa: BLE001 - the server rejects a malformed Bind itself
            formats, values = [], []
        for w in writes:
            keys: list[Hashable] | None = [] if w.keys is not None else None
            pk_type = cat.key_types.get(w.entity, "text")
            for ref in w.keys or ():
                if ref.param is None:
                    keys.append(ref.value)  # type: ignore[union-attr]
                    continue
                i = ref.param - 1
                if ref.array or i >= len(values):
                    keys = None
                    break
                fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
                key = _decode_param(values[i], fmt, pk_type)
                if key is None:
                    keys = None
                    break
                keys.append(key)  # type: ignore[union-attr]
            self._touch(cat, w, keys, pre)
        if name and (writes or opaque):
            self._wrap(pre)
        return self._send(pre)

    # --- DDL --------------------------------------------------------------------------------

    def ddl(self, client: ClientSession, text: bytes) -> bool:
        """``CREATE TABLE tv_x AS SELECT`` / ``DROP TABLE tv_x``: run by the engine, answered
        by the proxy (True), or not TVIEW DDL (False)."""
        if b";" in text and self._commit_after_writes(client, text):
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
        cat = self.engine.catalog(client.database)
        if cat.empty:
            return False
        sql = text.decode("utf-8", "replace")
        cmds = classify(sql)
        ends = [i for i, c in enumerate(cmds) if c is not None and c.kind in _COMMITS]
        if not ends or None not in cmds[:ends[-1]]:
            return False
        try:
            writes = capture(sql, cat.tracked)
        except pglast.parser.ParseError:
            return False
        if not writes and not is_opaque(sql, cat.functions, cat.trigger_tables):
            return False
        _answer_soon(client, B.error_response(
            "0A000", "tvproxy: a query string that writes TVIEW source tables cannot also "
            "COMMIT or PREPARE TRANSACTION", hint="send COMMIT as a query of its own")
            + B.ready_for_query(b"T" if self.in_block else b"I"))
        return True

    async def _run_ddl(self, client: ClientSession, stmt: CreateTview | DropTviews) -> None:
        """Outside a transaction block on a control connection (its own transaction, as
        autocommit DDL is); inside one on the client's server, in the client's transaction."""
        engine = self.engine
        if self.in_block:
            conn: Any = ServerConversation(lambda batch: self._talk(client, batch))
            out, ok = await self._ddl_on(conn, stmt)
            if ok:
                self.reload_after = True  # seen by everyone once the client commits
                status = b"T"
            else:
                status = b"E"
                with contextlib.suppress(ServerError):  # abort it, as PostgreSQL's DDL would
                    await conn.execute("DO $$BEGIN RAISE EXCEPTION 'tvproxy: TVIEW DDL "
                                       "failed'; END$$")
            client.ddl_done(out + B.ready_for_query(status))
            return
        out = b""
        try:
            conn = await engine._connect(client.database)
        except Exception as exc:  # noqa: BLE001 - the server's own error, as it said it
            out = B.error_response(getattr(exc, "sqlstate", None) or "08006", str(exc))
        else:
            try:
                out, ok = await self._ddl_on(conn, stmt)
            finally:
                await conn.close()
            if ok:
                await engine.reload(client.database)
        client.ddl_done(out + B.ready_for_query(b"I"))

    async def _ddl_on(self, conn: Any, stmt: CreateTview | DropTviews) -> tuple[bytes, bool]:
        from tvproxy.tview.ddl import create_tview, drop_tviews

        cfg = self.engine.cfg
        try:
            if isinstance(stmt, CreateTview):
                res = await create_tview(conn, stmt, cfg.schema, cfg.lock_namespace)
                out = b"".join(B.notice_response(w, "01000", "WARNING") for w in res.warnings)
                return out + B.command_complete(f"SELECT {res.rows}"), True
            await drop_tviews(conn, stmt, cfg.schema)
            return B.command_complete("DROP TABLE"), True
        except TviewError as exc:
            return B.error_response(exc.sqlstate, exc.message), False
        except Exception as exc:  # noqa: BLE001 - the server's own error, as it said it
            sqlstate = getattr(exc, "sqlstate", None) or "XX000"
            return B.error_response(sqlstate, str(exc)), False

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
                                cat.fk_sources)
        except TviewError as exc:  # 54001: fail the COMMIT with it
            return RefreshPlan((), (f"DO $$BEGIN RAISE EXCEPTION USING ERRCODE = "
                                    f"'{exc.sqlstate}', MESSAGE = "
                                    f"{_sql_literal(exc.message)}; END$$",), ((),))
        if plan is not None:
            st = self.engine.stat(self.client.database, "*")
            st.keys_enqueued += sum(len(v) for v in keys.values())
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
                for e in _all_affected(cat, entity):
                    keys.setdefault(e, set()).add(marker)
        plan = self._plan(cat, keys)
        if self.engine.cfg.opaque_writes == "reject" and (waiting or self.opaque_tables):
            check = reject_sql()
            plan = RefreshPlan((), (check,), ((),)) if plan is None else RefreshPlan(
                plan.entities, (check, *plan.statements), ((), *plan.params))
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
                self._plan_batch(pre, cat, self.tracker.take(), False)
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
        try:
            if reload:
                await self.engine.reload(client.database, announce=True)
            for gid in gids:
                await self.engine.catch_up(client.database, gid)
        finally:
            client.ddl_done(B.ready_for_query(status))

    def injected(self, rows: list[list[bytes | None]], error: dict[str, str] | None) -> bool:
        """Replies of an injected batch: refresh counts for the statistics, keys found by
        pre-images and audits.  True: the batch's error is not the client's concern."""
        if not self.inflight:
            return False
        meta = self.inflight.pop(0)
        if isinstance(meta, _Talk):
            client = self.client
            cols = row_description(client.inject_desc) if client.inject_desc else []
            tag = client.inject_tag.decode() if client.inject_tag else ""
            if not meta.future.done():
                meta.future.set_result(Reply(cols, rows, tag, error))
            return True  # the conversation reports its errors itself
        if isinstance(meta, _Audit):
            if meta.close:
                self.audits_inflight -= 1
                if error is None and meta.txn == self.txn:
                    found = [meta.tables[int(r[0]) - 1] for r in rows if r and r[0] is not None]
                    if found:
                        self._opaque_found(self.engine.catalog(self.client.database), found)
            return True  # a baseline or comparison in an aborted transaction: nothing to do
        if isinstance(meta, str):  # a pre-image: the parents of the children written next
            if error is None:
                integer = self.engine.catalog(self.client.database).key_types.get(meta) in (
                    "bigint", "integer", "smallint")
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
        # rows: keys statement (one row, one count per entity), lock count, one row per TVIEW
        counts = rows[0] if rows else []
        refreshed = rows[2:]
        now = time.time()
        for i, entity in enumerate(plan.entities):
            st = self.engine.stat(db, entity)
            st.commits += 0 if flush else 1
            st.refresh_statements += 1
            keys = int(counts[i]) if i < len(counts) and counts[i] is not None else 0
            st.keys_enqueued += keys
            if i < len(refreshed):
                up, dele = refreshed[i][0], refreshed[i][1]
                st.rows_refreshed += int(up or 0)
                st.rows_deleted += int(dele or 0)
            st.total_refresh_us += elapsed
            st.max_refresh_us = max(st.max_refresh_us, elapsed)
            st.last_refresh_at = now
            total.refresh_statements += 1
        total.total_refresh_us += elapsed
        total.max_refresh_us = max(total.max_refresh_us, elapsed)
        total.last_refresh_at = now
        log.info("tview refresh", client=self.client.id, database=db,
                 entities=list(plan.entities), keys=[int(c or 0) for c in counts],
                 statements=len(plan.statements), ms=round(elapsed / 1000, 3))
        return False


def _answer_soon(client: ClientSession, replies: bytes) -> None:
    """Answer a Query the engine took over, once the session has finished reading it."""
    asyncio.get_running_loop().call_soon(client.ddl_done, replies)


def _all_affected(cat: RuntimeCatalog, entity: str) -> list[str]:
    """Entities to refresh fully when every row of ``entity`` may have changed: itself, the
    TVIEWs aggregating it (old parents unknown) and those refreshed fully on it."""
    return [entity, *cat.aggregated_into.get(entity, ()), *cat.full_on.get(entity, ())]


def _preimage_batch(sql: str, keys: list[Hashable]) -> bytes:
    """A SELECT of parent keys, on a named statement so a client's unnamed one survives."""
    name = b"tvproxy_preimage"
    return (B.parse(name, sql.encode()) + B.bind(name, [B.text_value(list(keys))])
            + B.execute() + B.close_statement(name) + B.SYNC)


def _sql_literal(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

