"""The glue between sessions and the pure TVIEW layers: catalogs per database, the per-client
hooks (session/hooks.py) that track keys and inject refresh plans, and the statistics.

Where keys are recorded: :meth:`TviewSession.query` / :meth:`TviewSession.bind`.  Where a plan is
injected: before a COMMIT (``query``) and at the end of implicit transactions
(:meth:`TviewSession.ready`: the proxy opened the block with BEGIN and closes it with
plan + COMMIT in one round trip).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from struct import pack
from typing import TYPE_CHECKING, Any

import pglast

from tvproxy.log import get_logger
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D
from tvproxy.tview.analyze import CreateTview, DropTviews, TviewError, parse_tview_ddl
from tvproxy.tview.capture import WriteCapture, capture
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.planner import ALL_KEYS, RefreshPlan, plan_refresh
from tvproxy.tview.returning_hooks import ReturningHooks
from tvproxy.tview.tracker import TransactionTracker
from tvproxy.tview.txcontrol import TxKind, classify

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession

log = get_logger("tvproxy.tview")
EMPTY = RuntimeCatalog()


@dataclass
class EntityStats:
    commits: int = 0
    keys_enqueued: int = 0
    keys_coalesced: int = 0
    rows_refreshed: int = 0
    rows_deleted: int = 0
    cascade_rows: int = 0
    full_refreshes: int = 0
    refresh_statements: int = 0
    errors: int = 0
    total_refresh_us: int = 0
    max_refresh_us: int = 0
    last_refresh_at: float = 0.0


def _array_literal(values: list[object]) -> bytes:
    parts = []
    for v in values:
        if isinstance(v, int):
            parts.append(str(v))
        else:
            parts.append('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"')
    return ("{" + ",".join(parts) + "}").encode()


def plan_messages(plan: RefreshPlan) -> bytes:
    """The plan as extended-protocol messages, keys bound as text array parameters."""
    out = []
    for sql, params in zip(plan.statements, plan.params, strict=True):
        out.append(B.parse(b"", sql.encode()))
        body = b"\x00\x00" + pack("!HH", 0, len(params))
        for p in params:
            val = _array_literal(p) if isinstance(p, list) else str(p).encode()
            body += pack("!i", len(val)) + val
        out.append(B.message(b"B", body + b"\x00\x00"))
        out.append(B.message(b"E", b"\x00\x00\x00\x00\x00"))
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

    async def reload(self, database: str) -> None:
        from tvproxy.tview.ddl import load_runtime

        try:
            conn = await self._connect(database)
            try:
                self.catalogs[database] = cat = await load_runtime(conn, self.cfg.schema)
            finally:
                await conn.close()
            if not cat.empty:
                await self._listen(database)
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
        self.stmts: dict[bytes, tuple[WriteCapture, ...]] = {}
        self.inflight: list[tuple[RefreshPlan, float, bool]] = []
        self.started = 0.0
        self._init_returning()

    # --- recording keys --------------------------------------------------------------------

    def _touch(self, cat: RuntimeCatalog, w: WriteCapture, keys: list[Hashable] | None,
               pre: list[tuple[bytes, object]]) -> None:
        tracker = self.tracker
        tracker.touch(w.entity, keys if keys is not None else [ALL_KEYS])
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
                plan = self._plan(cat, self.tracker.take())
                if plan is not None:
                    pre.append((plan_messages(plan) + B.SYNC, (plan, time.monotonic(), False)))
                self.tracker.reset()
                self.started = 0.0
                self.in_block = kind is TxKind.COMMIT_AND_CHAIN
            elif kind in (TxKind.ROLLBACK, TxKind.ROLLBACK_AND_CHAIN):
                self.tracker.reset()
                self.in_block = kind is TxKind.ROLLBACK_AND_CHAIN
            elif kind is TxKind.SAVEPOINT and cmd.name:
                self.tracker.savepoint(cmd.name)
            elif kind is TxKind.RELEASE and cmd.name:
                self.tracker.release(cmd.name)
            elif kind is TxKind.ROLLBACK_TO and cmd.name:
                self.tracker.rollback_to(cmd.name)

    def _read_your_writes(self, sql: str, pre: list[tuple[bytes, object]],
                          cat: RuntimeCatalog) -> None:
        if not self.engine.cfg.read_your_writes or not self.in_block and not self.wrapped:
            return
        low = sql.lower()
        if not any(t in low for t in cat.tv_tables):
            return
        pending = self.tracker.pending()
        if not pending:
            return
        plan = self._plan(cat, pending)
        if plan is not None:
            pre.append((plan_messages(plan) + B.SYNC, (plan, time.monotonic(), True)))

    def _statement(self, sql: str, pre: list[tuple[bytes, object]],
                   cat: RuntimeCatalog) -> tuple[WriteCapture, ...]:
        """What every statement text goes through (Query or Parse): flush for reads of tv_
        tables, transaction control, and the tracked writes it makes."""
        if self.ret_live or self.inflight:  # keys that have not all arrived yet
            self._returning_plan_point(sql, cat)
        self._read_your_writes(sql, pre, cat)
        self._tx_commands(sql, pre, cat)
        try:
            return capture(sql, cat.tracked)
        except pglast.parser.ParseError:
            return ()

    def query(self, client: ClientSession, text: bytes) -> list[bytes] | None:
        """A simple Query: returns the messages to run first (each ending in one
        ReadyForQuery), or None."""
        cat = self.engine.catalog(client.database)
        if cat.empty:
            return None
        pre: list[tuple[bytes, object]] = []
        writes = self._statement(text.decode("utf-8", "replace"), pre, cat)
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
        cat = self.engine.catalog(client.database)
        if cat.empty:
            return None
        pre: list[tuple[bytes, object]] = []
        writes = self._statement(text.decode("utf-8", "replace"), pre, cat)
        if writes:
            self.stmts[name] = writes
            self._wrap(pre)  # before the Parse: a Query in between would drop an unnamed one
        else:
            self.stmts.pop(name, None)
        return self._send(pre)

    def bind(self, client: ClientSession, name: bytes, body: bytes, pos: int) -> list[bytes] | None:
        writes = self.stmts.get(name)
        if not writes:
            return None
        cat = self.engine.catalog(client.database)
        try:
            formats, values = D.bind_params(body, pos)
        except Exception:  # noqa: BLE001 - the server rejects a malformed Bind itself
            formats, values = [], []
        pre: list[tuple[bytes, object]] = []
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
        if name:
            self._wrap(pre)
        return self._send(pre)

    # --- DDL --------------------------------------------------------------------------------

    def ddl(self, client: ClientSession, text: bytes) -> bool:
        """``CREATE TABLE tv_x AS SELECT`` / ``DROP TABLE tv_x``: run by the engine, answered
        by the proxy (True), or not TVIEW DDL (False)."""
        head = text[:64].lstrip().lower()
        if b"tv_" not in text or not head.startswith((b"create", b"drop")):
            return False
        try:
            stmt = parse_tview_ddl(text.decode("utf-8", "replace"))
        except TviewError as exc:
            client.ddl_done(B.error_response(exc.sqlstate, exc.message)
                            + B.ready_for_query(b"T" if self.in_block else b"I"))
            return True
        if stmt is None:
            return False
        asyncio.ensure_future(self._run_ddl(client, stmt))
        return True

    async def _run_ddl(self, client: ClientSession, stmt: CreateTview | DropTviews) -> None:
        from tvproxy.tview.ddl import create_tview, drop_tviews

        status = b"T" if self.in_block else b"I"
        if self.in_block:
            client.ddl_done(B.error_response(
                "0A000", "TVIEW DDL cannot run inside a transaction block through tvproxy",
                hint="run CREATE/DROP TABLE tv_... outside BEGIN/COMMIT") + B.ready_for_query(status))
            return
        engine = self.engine
        cfg = engine.cfg
        out = b""
        try:
            conn = await engine._connect(client.database)
            try:
                if isinstance(stmt, CreateTview):
                    res = await create_tview(conn, stmt, cfg.schema, cfg.lock_namespace)
                    out = b"".join(B.notice_response(w, "01000", "WARNING") for w in res.warnings)
                    out += B.command_complete(f"SELECT {res.rows}")
                else:
                    await drop_tviews(conn, stmt, cfg.schema)
                    out = B.command_complete("DROP TABLE")
            finally:
                await conn.close()
            await engine.reload(client.database)
        except TviewError as exc:
            out = B.error_response(exc.sqlstate, exc.message)
        except Exception as exc:  # noqa: BLE001 - the server's own error, as it said it
            sqlstate = getattr(exc, "sqlstate", None) or "XX000"
            out = B.error_response(sqlstate, str(exc))
        client.ddl_done(out + B.ready_for_query(status))

    # --- ends of transactions --------------------------------------------------------------

    def _plan(self, cat: RuntimeCatalog, keys: dict[str, set[Hashable]]) -> RefreshPlan | None:
        if not keys:
            return None
        cfg = self.engine.cfg
        try:
            plan = plan_refresh(cat.specs, cat.order, keys, cat.key_types, cfg.lock_namespace,
                                cfg.max_propagation_depth, cat.all_keys, cat.derived)
        except TviewError as exc:  # 54001: fail the COMMIT with it
            return RefreshPlan((), (f"DO $$BEGIN RAISE EXCEPTION USING ERRCODE = "
                                    f"'{exc.sqlstate}', MESSAGE = "
                                    f"{_sql_literal(exc.message)}; END$$",), ((),))
        if plan is not None:
            st = self.engine.stat(self.client.database, "*")
            st.keys_enqueued += sum(len(v) for v in keys.values())
        return plan

    def ready(self, client: ClientSession, status: bytes) -> list[bytes] | None:
        """ReadyForQuery for the client with nothing outstanding: close a transaction the
        proxy opened (plan + COMMIT, or ROLLBACK), else follow the server's status."""
        if self.wrapped:
            self.wrapped = False
            if status == b"T":
                cat = self.engine.catalog(client.database)
                plan = self._plan(cat, self.tracker.take())
                self.tracker.reset()
                self.started = 0.0
                pre: list[tuple[bytes, object]] = []
                if plan is not None:
                    pre.append((plan_messages(plan) + B.SYNC, (plan, time.monotonic(), False)))
                pre.append((B.query("COMMIT"), None))
                return self._send(pre)
            self.tracker.reset()
            return self._send([(B.query("ROLLBACK"), None)])
        if status == b"I":
            self.in_block = False
            self.tracker.reset()
            self.started = 0.0
        else:
            self.in_block = True
        return None

    def injected(self, rows: list[list[bytes | None]], error: dict[str, str] | None) -> None:
        """Replies of an injected batch: refresh counts for the statistics."""
        if not self.inflight:
            return
        meta = self.inflight.pop(0)
        if isinstance(meta, str):  # a pre-image: the parents of the children written next
            if error is None:
                integer = self.engine.catalog(self.client.database).key_types.get(meta) in (
                    "bigint", "integer", "smallint")
                vals = [r[0].decode() for r in rows if r and r[0] is not None]
                self.tracker.touch(meta, [int(v) for v in vals] if integer else vals)
                self.tracker.statement_succeeded()
            return
        if meta is None:
            return
        plan, started, flush = meta  # type: ignore[misc]
        if not plan.entities:
            return
        db = self.client.database
        elapsed = int((time.monotonic() - started) * 1e6)
        total = self.engine.stat(db, "*")
        if error is not None:
            total.errors += 1
            return
        if not flush:
            self.engine.commits += 1
            total.commits += 1
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


def _preimage_batch(sql: str, keys: list[Hashable]) -> bytes:
    """A SELECT of parent keys, on a named statement so a client's unnamed one survives."""
    name = b"tvproxy_preimage"
    val = _array_literal(list(keys))
    return (B.parse(name, sql.encode()) + B.message(
        b"B", b"\x00" + name + b"\x00" + pack("!HHi", 0, 1, len(val)) + val + b"\x00\x00")
        + B.message(b"E", b"\x00\x00\x00\x00\x00") + B.close_statement(name) + B.SYNC)


def _sql_literal(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

