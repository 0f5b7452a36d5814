"""One client connection: startup, auth, and the transaction state machine of the data path.

Client bytes are framed by header only; complete messages are forwarded to the linked server
in one write per chunk, rewritten only for named prepared statements.  Every forwarded request
pushes what its response looks like onto ``expect`` so that server replies can be matched:
that is how the session knows when the server is free (ReadyForQuery 'I' with nothing
outstanding), which replies it must swallow (its own SET/Parse/Close) and where to insert the
replies it makes up (ParseComplete/CloseComplete the client expects but the server never sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING

from tvproxy.log import get_logger
from tvproxy.pool.server import ServerConnection, ServerLoginError
from tvproxy.protocol import CONTINUATION, Framer, ProtocolError
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D
from tvproxy.protocol.strip import message_length, split_data_row, strip_row_description
from tvproxy.session import params as P
from tvproxy.session.auth import authenticate
from tvproxy.session.hooks import StripReply, TransactionHooks
from tvproxy.session.prepared import PreparedStatement

if TYPE_CHECKING:
    from tvproxy.pool.pool import Pool
    from tvproxy.server import ProxyServer

log = get_logger("tvproxy.client")
_ids = itertools.count(1)

# expectation kinds (ints on the hot path; tuples carry data for the rare ones)
EXP_QUERY = 0      # forward everything up to and including ReadyForQuery
EXP_SKIPQ = 1      # proxy's own simple query: swallow everything up to ReadyForQuery
EXP_EXT = 2        # extended request: forward up to its terminal reply
EXP_SYNC = 3       # Sync: forward ReadyForQuery
EXP_SKIP1 = 4      # proxy's own Close: swallow its terminal reply
EXP_PARAMS = 5     # proxy's SET re-applying client settings: swallow, hold the client meanwhile
EXP_INJECT = 6     # the TVIEW engine's own batch: swallowed, rows and first error to the engine
FAKE = 10          # (FAKE, bytes): reply made by the proxy, emitted when it reaches the head
PARSE_NEW = 11     # (PARSE_NEW, stmt, skip, client name): Parse new to this server

TERMINALS = frozenset(b"123CIsnT")
ADMIN_DATABASES = ("tvproxy", "pgbouncer")
WAITING_READ_LIMIT = 1 << 20
LOGIN_INPUT_LIMIT = 1 << 20


def _parse_body(body: bytes, name: bytes, sql: bytes, new: bytes) -> bytes:
    """A Parse body with statement text ``new`` instead of ``sql`` (parameter types kept)."""
    return name + b"\x00" + new + body[len(name) + len(sql) + 1:]


class ClientSession(asyncio.Protocol):
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.framer = Framer(max_size=proxy.cfg.proxy.max_packet_size)
        self.closed = False
        self.ready = False
        self.user = ""
        self.database = ""
        self.params: dict[str, str] = {}
        self.param_sig: tuple = ()
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        self.expect: deque = deque()
        self.copy_in = False
        self.waiting = False
        self.holding = False
        self.batch = 0  # since the last Sync: 1 = only named-statement Parse/Describe/Close
        self.flush_release = False
        self.param_error: dict[str, str] | None = None
        self.wait_started = 0.0
        self.connect_time = time.time()
        self.request_time = self.connect_time
        self.login_started = time.monotonic()
        self.idle_since = time.monotonic()
        self.prepared: dict[bytes, PreparedStatement] = {}
        self.pid = secrets.randbits(31) or 1
        self.secret = secrets.randbits(32)
        self.addr = ("", 0)
        self.local_addr = ("", 0)
        self.admin = None
        self.stats = None
        self.tview: TransactionHooks | None = None  # the TVIEW engine's seam (session/hooks.py)
        self.tv_hold = False  # input held while the proxy closes a transaction it opened
        self.tv_deferred = False  # the client's ReadyForQuery waits for the injected COMMIT
        self.inject_rows: list[bytes] = []  # DataRow bodies of an injected batch
        self.inject_error: bytes | None = None
        self.inject_batch_error: bytes | None = None  # the error of the batch being read
        self.inject_skipped = False  # the server skipped the batch after the client's error
        self.skip_to_sync = False  # the server skips the client's messages up to its Sync
        self.inject_desc: bytes | None = None
        self.inject_tag: bytes | None = None
        self.strip_row: bytearray | None = None  # a big DataRow to strip, until it is whole
        self.strip_len = 0
        self._startup = bytearray()
        self._paused_server: ServerConnection | None = None
        self._input_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.addr = (str(peer[0]), int(peer[1]))
        if isinstance(sock, tuple):
            self.local_addr = (str(sock[0]), int(sock[1]))
        self.proxy.client_connected(self)
        self._task = asyncio.get_running_loop().create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self.ready:
            stats = self.stats
            if stats is not None:
                stats.bytes_received += len(data)
            self.framer.feed(data)
            if self.waiting or self.holding:
                self._limit_queued_input()
                return
            if self.admin is not None:
                self.admin.process()
            else:
                self._process_client()
            return
        if not self.closed:
            self._startup += data
            if len(self._startup) > LOGIN_INPUT_LIMIT:  # nobody sends that much before login
                self.fatal("08P01", "too much data before authentication completed")
                return
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnect()

    def pause_writing(self) -> None:
        # this client reads slower than its server answers: stop reading from the server
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.pause_reading()
            self._paused_server = server

    def resume_writing(self) -> None:
        # the paused server is resumed even if it was released meanwhile (it must not stay
        # deaf for its next client)
        server = self._paused_server
        self._paused_server = None
        if server is not None and server.transport is not None and not server.closed:
            server.transport.resume_reading()

    # --- writing and failing ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        """Send a FATAL ErrorResponse and close this connection only."""
        if not self.closed:
            self.write(B.error_response(sqlstate, message, "FATAL", detail))
            if self.transport is not None:
                self.transport.close()
        self._disconnect()

    def fail_waiting(self, err: ServerLoginError) -> None:
        self.waiting = False
        self.fatal(err.sqlstate, err.message)

    # --- login -----------------------------------------------------------------------------

    async def _read_exact(self, n: int) -> bytes:
        while len(self._startup) < n:
            if self.closed:
                raise ConnectionError
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = bytes(self._startup[:n])
        del self._startup[:n]
        return data

    async def read_message(self) -> tuple[int, bytes]:
        """Next whole message during login (auth exchange)."""
        header = await self._read_exact(5)
        length = int.from_bytes(header[1:5], "big")
        if length < 4 or length > 65536:
            raise ProtocolError(f"invalid message length {length} during authentication")
        return header[0], await self._read_exact(length - 4)

    async def _login(self) -> None:
        timeout = self.proxy.cfg.proxy.client_login_timeout
        try:
            await asyncio.wait_for(self._handshake(), timeout or None)
        except TimeoutError:
            self.fatal("08P01", "client_login_timeout")
        except ProtocolError as exc:
            self.proxy.stats.protocol_errors += 1
            log.info("client protocol error during login", client=self.id, error=exc.message)
            self.fatal(exc.sqlstate, exc.message)
        except ServerLoginError as exc:
            self.fatal(exc.sqlstate, exc.message)
        except ConnectionError:
            self._disconnect()
        except Exception as exc:  # noqa: BLE001 - never leave a client hanging on a bug
            log.exception("client login failed", client=self.id)
            self.fatal("XX000", f"internal error during login: {type(exc).__name__}")

    async def _handshake(self) -> None:
        while True:
            header = await self._read_exact(4)
            length = D.startup_packet_length(header)
            packet = D.parse_startup(header + await self._read_exact(length - 4))
            if isinstance(packet, D.SSLRequest | D.GSSENCRequest):
                self.write(b"N")
                continue
            if isinstance(packet, D.CancelRequest):
                self.proxy.forward_cancel(packet.pid, packet.secret)
                self._close_transport()
                return
            break
        assert isinstance(packet, D.StartupMessage)
        if packet.minor > 0 or packet.unknown_options:
            self.write(B.negotiate_protocol_version(0, packet.unknown_options))
        startup = packet.params
        self.user = startup.get("user", "")
        if not self.user:
            raise ProtocolError("no PostgreSQL user name specified in startup packet", "28000")
        self.database = startup.get("database") or self.user
        ignore = frozenset(self.proxy.cfg.proxy.ignore_startup_parameters)
        self.params = P.tracked_params(startup, ignore)
        self._params_changed()
        if not self.proxy.admit_client(self):
            raise ServerLoginError("no more connections allowed (max_client_conn)", "53300")
        is_admin = self.database in ADMIN_DATABASES
        if is_admin:
            if not self.proxy.is_admin_user(self.user):
                await authenticate(self, self.proxy)  # no hint on who is allowed before auth
                raise ServerLoginError(f'not allowed to connect to admin console as "{self.user}"', "28000")
        elif self.database not in self.proxy.cfg.databases:
            raise ServerLoginError(f'no such database: {self.database}', "3D000")
        elif self.database in self.proxy.disabled_dbs:
            raise ServerLoginError(f'database "{self.database}" is disabled', "57P03")
        await authenticate(self, self.proxy)
        if is_admin:
            from tvproxy.admin.console import AdminSession

            self.admin = AdminSession(self.proxy, self)
            welcome = self.proxy.admin_welcome()
        else:
            self.pool = self.proxy.get_pool(self.database, self.user)
            self.stats = self.pool.stats
            if self.proxy.tviews is not None:
                from tvproxy.tview.engine import TviewSession

                engine = self.proxy.tviews
                if not engine.loaded.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(engine.loaded.wait(), engine.load_timeout)

                self.tview = TviewSession(self.proxy.tviews, self)
            welcome = dict(await self.pool.get_welcome())
            for key in welcome:
                if key in self.params:
                    welcome[key] = self.params[key]
        self.stats = self.stats or self.proxy.stats.for_db(self.database)
        self.stats.client_login_count += 1
        out = [B.auth_ok()]
        out += [B.parameter_status(k, v) for k, v in welcome.items()]
        out.append(B.backend_key_data(self.pid, self.secret))
        out.append(B.ready_for_query(b"I"))
        self.write(b"".join(out))
        self.proxy.register_cancel_key(self)
        self.ready = True
        rest = bytes(self._startup)
        self._startup = bytearray()
        log.info("client login", client=self.id, user=self.user, database=self.database,
                 addr=self.addr[0])
        if rest:
            self.data_received(rest)

    # --- client -> server ------------------------------------------------------------------

    def _limit_queued_input(self) -> None:
        """While queued for a server, stop reading a client that piles up input."""
        if self.framer.pending() > WAITING_READ_LIMIT and self.transport is not None:
            self.transport.pause_reading()
            self._input_paused = True

    def _process_client(self) -> None:
        if self.waiting or self.holding or self.closed:
            return
        if self._input_paused:
            self._input_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        framer = self.framer
        server = self.server
        out: list[bytes] = []
        run = -1  # start of a run of messages forwarded unchanged
        expect = self.expect
        buf = framer.buffer
        try:
            for mtype, start, end in framer.scan():
                if server is None:
                    if mtype == 0x58:  # Terminate while idle
                        self._close_transport()
                        return
                    if self.prepared_mapping and self._answer_unlinked(mtype, buf, start, end):
                        continue
                    server = self._link()
                    if server is None or self.holding:
                        # keep reading while queued (to notice a client that leaves) unless
                        # it piles up data
                        framer.unread(start)
                        self._limit_queued_input()
                        break
                    buf = framer.buffer
                if mtype == 0x51:  # Query
                    tv = self.tview
                    if tv is not None and not tv.db.active and buf.find(
                            b"tv_", start + 5, end) < 0:
                        tv = None  # no TVIEW in this database (and no TVIEW DDL): no work
                    if tv is not None and tv.ddl(self, D.query_text(buf[start + 5:end])):
                        self._flush_run(out, buf, run, start)
                        self.framer.unread(end)
                        self.holding = True
                        if out:
                            server.write(b"".join(out))
                        return
                    if tv is not None:
                        run = self._inject(out, buf, run, start, tv.query(
                            self, D.query_text(buf[start + 5:end])))
                        rw = tv.ret_query
                        if rw is not None:  # sent with appended RETURNING instead
                            tv.ret_query = None
                            run = self._flush_run(out, buf, run, start)
                            out.append(B.query(rw.sql))
                            expect.append(tv.expect_returning(rw, EXP_QUERY, False))
                            if tv.wrapped and tv.hold:
                                self._hold_after(out, buf, -1, end, end)
                                return
                            continue
                    if tv is not None and tv.convert_query:
                        tv.convert_query = False
                        self._query_implicit(tv, out, buf, run, start, end)
                        return
                    expect.append(EXP_QUERY)
                    if tv is not None and tv.wrapped and tv.hold:
                        self._hold_after(out, buf, run, start, end)
                        return
                elif mtype == 0x53:  # Sync
                    expect.append(EXP_SYNC)
                    self.batch = 0
                    tv = self.tview
                    if tv is not None and tv.wrapped:
                        self._hold_after(out, buf, run, start, end)
                        return
                elif mtype == 0x42:  # Bind
                    tv = self.tview
                    if tv is not None and (tv.stmts or tv.portals):  # a tracked write prepared
                        body = bytes(buf[start + 5:end])
                        portal, sname, bpos = D.bind_names(body)
                        if sname in tv.rewritten:
                            pre, body = tv.bind_returning(self, portal, sname, body, bpos)
                            run = self._inject(out, buf, run, start, pre)
                            run = self._flush_run(out, buf, run, start)
                            self.batch = 2
                            self.flush_release = False
                            if sname and self.prepared_mapping:
                                self._bind(out, body)
                            else:
                                out.append(B.message(b"B", body))
                                expect.append(EXP_EXT)
                            continue
                        if tv.portals:
                            tv.portals.pop(portal, None)
                        if tv.stmts:
                            run = self._inject(out, buf, run, start,
                                               tv.bind(self, sname, body, bpos))
                    self.batch = 2
                    self.flush_release = False
                    if buf[buf.find(b"\x00", start + 5, end) + 1] != 0 and self.prepared_mapping:
                        run = self._flush_run(out, buf, run, start)
                        self._bind(out, bytes(buf[start + 5:end]))
                        run = -1
                        continue
                    expect.append(EXP_EXT)
                elif mtype == 0x45:  # Execute
                    tv = self.tview
                    if tv is not None and tv.portals:
                        rw = tv.portals.get(D.execute_portal(bytes(buf[start + 5:end])))
                        expect.append(EXP_EXT if rw is None
                                      else tv.expect_returning(rw, EXP_EXT, False))
                    else:
                        expect.append(EXP_EXT)
                    self.batch = 2
                    self.flush_release = False
                elif mtype == 0x50 and buf[start + 5] == 0:  # unnamed Parse
                    self.batch = 2
                    self.flush_release = False
                    tv = self.tview
                    if tv is not None and (tv.db.active or tv.stmts or tv.rewritten):
                        body = bytes(buf[start + 5:end])
                        name, sql, _ = D.parse_message(body)
                        run = self._inject(out, buf, run, start, tv.parse(self, name, sql))
                        new = tv.parse_returning(self, name, sql)
                        if new is not None:  # prepared with appended RETURNING instead
                            run = self._flush_run(out, buf, run, start)
                            out.append(B.message(b"P", _parse_body(body, name, sql, new)))
                            expect.append(EXP_EXT)
                            continue
                    expect.append(EXP_EXT)
                elif mtype == 0x50:  # named Parse
                    tv = self.tview
                    if tv is not None and not (tv.db.active or tv.stmts or tv.rewritten):
                        tv = None
                    body = bytes(buf[start + 5:end]) if tv is not None \
                        or self.prepared_mapping else b""
                    new = None
                    if tv is not None:
                        name, sql, _ = D.parse_message(body)
                        run = self._inject(out, buf, run, start, tv.parse(self, name, sql))
                        new = tv.parse_returning(self, name, sql)
                        if new is not None:  # the server prepares it with appended RETURNING
                            body = _parse_body(body, name, sql, new)
                    self.flush_release = False
                    if self.prepared_mapping:
                        self.batch |= 1
                        run = self._flush_run(out, buf, run, start)
                        self._parse(out, body)
                        run = -1
                        continue
                    self.batch = 2
                    if new is not None:
                        run = self._flush_run(out, buf, run, start)
                        out.append(B.message(b"P", body))
                        expect.append(EXP_EXT)
                        continue
                    expect.append(EXP_EXT)
                elif mtype == 0x44 or mtype == 0x43:  # Describe / Close
                    self.flush_release = False
                    exp = EXP_EXT
                    tv = self.tview
                    if mtype == 0x44 and tv is not None and (tv.rewritten or tv.portals):
                        kind, dname = D.describe_or_close(bytes(buf[start + 5:end]))
                        rw = (tv.rewritten if kind == 0x53 else tv.portals).get(dname)
                        if rw is not None:  # answered without the appended columns
                            exp = tv.expect_returning(rw, EXP_EXT, True)
                    if buf[start + 5] == 0x53 and buf[start + 6] != 0 and self.prepared_mapping:
                        self.batch |= 1
                        run = self._flush_run(out, buf, run, start)
                        self._describe_or_close(out, mtype, bytes(buf[start + 5:end]), exp)
                        run = -1
                        continue
                    self.batch = 2
                    expect.append(exp)
                elif mtype == 0x48:  # Flush
                    # only named statements prepared/described since the last Sync (asyncpg's
                    # prepare): once answered, end the implicit transaction and free the server
                    if self.batch == 1:
                        self.flush_release = True
                elif mtype == 0x46:  # FunctionCall
                    expect.append(EXP_QUERY)
                elif mtype in (0x64, 0x63, 0x66, 0x48, CONTINUATION):  # copy data/done/fail, Flush
                    pass
                elif mtype == 0x58:  # Terminate while linked
                    self._flush_run(out, buf, run, start)
                    if out:
                        server.write(b"".join(out))
                    self._close_transport()
                    return
                else:
                    raise ProtocolError(f"invalid frontend message type {mtype}")
                if run < 0:
                    run = start
        except ProtocolError as exc:
            self.proxy.stats.protocol_errors += 1
            log.info("client protocol error", client=self.id, error=exc.message)
            self.fatal(exc.sqlstate, exc.message)
            return
        if run >= 0:
            pos = framer.position
            out.append(buf[run:pos] if type(buf) is bytes else bytes(buf[run:pos]))
        if out and server is not None:
            server.write(out[0] if len(out) == 1 else b"".join(out))

    def _inject(self, out: list[bytes], buf: bytes | bytearray, run: int, start: int,
                pre: list[bytes] | None) -> int:
        """Send what the TVIEW engine asks for before this message (each batch ends in one
        ReadyForQuery; its replies go to the engine, not the client)."""
        if not pre:
            return run
        run = self._flush_run(out, buf, run, start)
        for batch in pre:
            out.append(batch)
            self.expect.append(EXP_INJECT)
        return run

    def inject_now(self, batch: bytes) -> bool:
        """Send the engine's batch on the linked server now (the client is held); its replies
        go to the engine.  False when no server is linked."""
        if self.server is None:
            return False
        self.server.write(batch)
        self.expect.append(EXP_INJECT)
        return True

    def ddl_done(self, replies: bytes) -> None:
        """The engine ran TVIEW DDL for this client: answer it, free the server, go on."""
        self.write(replies)
        self.holding = False
        if not self.expect and self.server is not None and self.pool.pool_mode != "session":
            self._release_server()
        self._process_client()

    def _hold_after(self, out: list[bytes], buf: bytes | bytearray, run: int, start: int,
                    end: int) -> None:
        """Forward up to this message, then hold the client's input: the transaction the proxy
        opened is closed at its ReadyForQuery before anything else runs."""
        self.framer.unread(end)
        if run < 0:
            run = start
        tv = self.tview
        if tv is not None and tv.implicit and buf[start] == 0x53:
            self._close_implicit(tv, out, buf, run, start, end)
            return
        out.append(bytes(buf[run:end]))
        post = tv.close_now(self) if tv is not None else None
        if post:  # plan + COMMIT in the same round trip
            for batch in post:
                out.append(batch)
                self.expect.append(EXP_INJECT)
            self.tv_deferred = True
        self._hold_and_send(out)

    def _hold_and_send(self, out: list[bytes]) -> None:
        """Send ``out``; the client's input waits until the transaction the proxy took charge
        of is closed (its ReadyForQuery)."""
        self.holding = True
        self.tv_hold = True
        if self.server is not None:
            self.server.write(b"".join(out))

    def _close_implicit(self, tv: TransactionHooks, out: list[bytes], buf: bytes | bytearray,
                        run: int, start: int, end: int) -> None:
        """The client's Sync ends a batch whose implicit transaction the engine closes: the
        plan replaces the Sync (its own Sync commits it all), or a BEGIN goes before the Sync
        when keys are still to come (then closed at ReadyForQuery, see ``ready``)."""
        out.append(bytes(buf[run:start]))
        if self.skip_to_sync:  # a statement of the batch failed: nothing commits, no plan
            tv.abandon_implicit()
            out.append(bytes(buf[start:end]))
            self._hold_and_send(out)
            return
        self.expect.pop()  # the client's Sync, appended by the caller
        self._end_implicit(tv, out, bytes(buf[start:end]))

    def _query_implicit(self, tv: TransactionHooks, out: list[bytes], buf: bytes | bytearray,
                        run: int, start: int, end: int) -> None:
        """A Query of one autocommit write without rows to return: the same text as an unnamed
        Parse/Bind/Execute (a Query drops the unnamed statement anyway), closed like an
        extended batch; the client gets the replies of its Query (CommandComplete, and its
        ReadyForQuery after the plan's)."""
        self._flush_run(out, buf, run, start)
        self.framer.unread(end)
        out.append(B.parse(b"", bytes(buf[start + 5:end - 1])) + B.bind(b"", []) + B.EXECUTE)
        self.expect.extend((EXP_SKIP1, EXP_SKIP1, EXP_EXT))
        self._end_implicit(tv, out, B.SYNC)

    def _end_implicit(self, tv: TransactionHooks, out: list[bytes], sync: bytes) -> None:
        expect = self.expect
        post = tv.close_implicit(self)
        if post:
            for batch in post:
                out.append(batch)
                expect.append(EXP_INJECT)
            self.tv_deferred = True
        else:
            if post is None:
                begin, replies = tv.upgrade_at_sync()
                out.append(begin)
                expect.extend([EXP_SKIP1] * replies)
            out.append(sync)
            expect.append(EXP_SYNC)
        self._hold_and_send(out)

    @staticmethod
    def _flush_run(out: list[bytes], buf: bytes | bytearray, run: int, start: int) -> int:
        if run >= 0 and start > run:
            out.append(bytes(buf[run:start]))
        return -1

    @property
    def prepared_mapping(self) -> bool:
        pool = self.pool
        return (pool is not None and pool.pool_mode == "transaction"
                and self.proxy.cfg.proxy.max_prepared_statements > 0)

    def _push_fake(self, reply: bytes) -> None:
        if self.expect:
            self.expect.append((FAKE, reply))
        else:
            self.write(reply)

    def _ensure_on_server(self, out: list[bytes], stmt: PreparedStatement) -> None:
        server = self.server
        assert server is not None
        if stmt.server_name in server.prepared:
            server.prepared.move_to_end(stmt.server_name)
            return
        self._evict(out, server)
        out.append(stmt.parse_msg)
        server.prepared[stmt.server_name] = None
        self.expect.append((PARSE_NEW, stmt, True, None))
        self.stats.server_parse_count += 1

    def _evict(self, out: list[bytes], server: ServerConnection) -> None:
        limit = self.proxy.cfg.proxy.max_prepared_statements
        while len(server.prepared) >= limit:
            name, _ = server.prepared.popitem(last=False)
            out.append(B.close_statement(name))
            self.expect.append(EXP_SKIP1)

    def _parse(self, out: list[bytes], body: bytes) -> None:
        name, _sql, pos = D.parse_message(body)
        server = self.server
        assert server is not None
        self.stats.client_parse_count += 1
        existing = self.prepared.get(name)
        if existing is not None:
            # PostgreSQL answers 42P05; let the server say so for the shared statement.
            self._ensure_on_server(out, existing)
            out.append(existing.parse_msg)
            self.expect.append(EXP_EXT)
            return
        stmt = self.proxy.prepared.acquire(body[pos:])
        self.prepared[name] = stmt
        if stmt.server_name in server.prepared:
            server.prepared.move_to_end(stmt.server_name)
            self._push_fake(B.PARSE_COMPLETE)
            return
        self._evict(out, server)
        out.append(stmt.parse_msg)
        server.prepared[stmt.server_name] = None
        self.expect.append((PARSE_NEW, stmt, False, name))
        self.stats.server_parse_count += 1

    def _bind(self, out: list[bytes], body: bytes) -> None:
        portal, name, pos = D.bind_names(body)
        self.stats.bind_count += 1
        stmt = self.prepared.get(name)
        if stmt is None:  # unknown name: the server answers 26000 with the client's own name
            out.append(B.message(b"B", body))
        else:
            self._ensure_on_server(out, stmt)
            out.append(B.message(b"B", portal + b"\x00" + stmt.server_name + b"\x00" + body[pos:]))
        self.expect.append(EXP_EXT)

    def _describe_or_close(self, out: list[bytes], mtype: int, body: bytes,
                           exp: int = EXP_EXT) -> None:
        _kind, name = D.describe_or_close(body)
        if mtype == 0x43:  # Close statement: answered by the proxy
            stmt = self.prepared.pop(name, None)
            if stmt is not None:
                self.proxy.prepared.release(stmt)
            self._push_fake(B.CLOSE_COMPLETE)
            return
        stmt = self.prepared.get(name)
        if stmt is None:
            out.append(B.message(b"D", body))
        else:
            self._ensure_on_server(out, stmt)
            out.append(B.message(b"D", b"S" + stmt.server_name + b"\x00"))
        self.expect.append(exp)

    # --- linking ---------------------------------------------------------------------------

    def _answer_unlinked(self, mtype: int, buf: bytes | bytearray, start: int, end: int) -> bool:
        """Answer Parse (of a statement already validated)/Close/Sync without a server.

        Drivers that prepare synchronously (libpq's PQprepare in pgbench) would otherwise hold
        a pool slot hostage while waiting for one: with more clients than servers that can
        deadlock a whole client thread.  Nothing else is answered without a server.
        """
        if mtype == 0x50 and buf[start + 5] != 0:
            body = bytes(buf[start + 5:end])
            name, sql, pos = D.parse_message(body)
            if name in self.prepared:
                return False
            tv = self.tview
            if tv is not None and not (tv.db.active or tv.stmts or tv.rewritten):
                tv = None
            if tv is not None and tv.may_track(self, sql):
                return False  # the engine records (and may rewrite) it: with a server
            stmt = self.proxy.prepared.lookup(body[pos:])
            if stmt is None or not stmt.validated:
                return False
            self.prepared[name] = self.proxy.prepared.acquire(body[pos:])
            self.stats.client_parse_count += 1
            if tv is not None:  # a named statement: only recorded, nothing to send
                tv.parse(self, name, sql)
            self.write(B.PARSE_COMPLETE)
            return True
        if mtype == 0x43 and buf[start + 5] == 0x53:
            self._describe_or_close([], mtype, bytes(buf[start + 5:end]))
            return True
        if mtype == 0x53:
            self.write(B.ready_for_query(b"I"))
            return True
        return mtype == 0x48

    def _link(self) -> ServerConnection | None:
        pool = self.pool
        assert pool is not None
        server = pool.checkout(self)
        if server is None:
            self.waiting = True
            return None
        self._attach(server)
        return server

    def assign_server(self, server: ServerConnection) -> None:
        """Called by the pool when a server frees up for this waiting client."""
        self.waiting = False
        self.stats.wait_time += int((time.monotonic() - self.wait_started) * 1e6)
        self._attach(server)
        self._process_client()

    def _attach(self, server: ServerConnection) -> None:
        server.client = self
        self.server = server
        now = time.monotonic()
        server.link_time = now
        self.stats.server_assignment_count += 1
        self.request_time = time.time()
        if server.param_sig is not self.param_sig:
            sql = P.apply_sql(self.params, server.params, server.login_params, server.params_set)
            if sql:
                self.holding = True
                self.expect.append(EXP_PARAMS)
                server.write(B.query(sql))
                # what the server does not report back is known from what was sent
                for key, value in self.params.items():
                    server.params[key] = value
                    server.params_set.add(key)
                for key in list(server.params_set - self.params.keys()):
                    default = server.login_params.get(key)
                    if default is None:
                        server.params.pop(key, None)
                        server.params_set.discard(key)
                    else:
                        server.params[key] = default
            server.param_sig = self.param_sig

    def _params_changed(self) -> None:
        # servers remember the settings they carry by this interned signature (identity check)
        self.param_sig = self.proxy.intern_params(tuple(sorted(self.params.items())))

    def _release_server(self) -> None:
        server = self.server
        if server is None:
            return
        self.server = None
        self.stats.xact_time += int((time.monotonic() - server.link_time) * 1e6)
        self.idle_since = time.monotonic()
        if self._paused_server is server:
            self.resume_writing()  # nothing more comes from it for us; its next client needs it
        assert self.pool is not None
        self.pool.release(server)
        if self.proxy.shutdown_mode is not None:
            self.proxy.check_shutdown()

    # --- server -> client ------------------------------------------------------------------

    def server_data(self, server: ServerConnection, data: bytes) -> None:
        stats = self.stats
        stats.bytes_sent += len(data)
        framer = server.framer
        expect = self.expect
        out: list[bytes] = []
        run = -1
        release = False
        resume = False
        tv = self.tview
        strip = tv is not None and bool(tv.ret_live)  # replies of rewritten statements ahead
        try:
            framer.feed(data)
            buf = framer.buffer
            for mtype, start, end in framer.scan():
                head = expect[0] if expect else EXP_QUERY
                if head == EXP_INJECT or self.inject_error is not None:
                    run = self._flush_run(out, buf, run, start)
                    done = self._injected_reply(server, head, mtype, buf, start, end, out)
                    if done == 0:
                        continue
                    if done == 2:
                        release = True
                    resume = True
                    continue
                if strip and type(head) is StripReply:
                    if mtype == 0x44 or mtype == 0x54 or (mtype == CONTINUATION
                                                          and self.strip_row is not None):
                        run = self._flush_run(out, buf, run, start)
                        if self._strip_reply(head, mtype, buf, start, end, out):
                            expect.popleft()  # a Describe's RowDescription ends it
                            self._emit_fakes(out)
                        continue
                    if mtype == 0x43 or mtype == 0x73:  # CommandComplete / PortalSuspended
                        tv.returning_done(head, mtype == 0x43)  # type: ignore[union-attr]
                if mtype == 0x5A:  # ReadyForQuery
                    status = buf[start + 5:start + 6]
                    server.status = status
                    self.copy_in = False
                    self.skip_to_sync = False
                    # requests still waiting for a reply were skipped after an error: drop them
                    while expect and (type(expect[0]) is tuple or expect[0] == EXP_EXT
                                      or expect[0] == EXP_SKIP1):
                        self._drop_head(error=True)
                    if expect:
                        head = expect.popleft()
                    stats.query_count += 1
                    if status == b"I":
                        stats.xact_count += 1
                    if head == EXP_PARAMS or head == EXP_SKIPQ:
                        run = self._flush_run(out, buf, run, start)
                        if head == EXP_PARAMS:
                            self.holding = False
                            resume = True
                        elif not expect and status == b"I" and self.pool.pool_mode != "session":
                            release = True
                        self._emit_fakes(out)
                        continue
                    if self.tv_deferred and expect and expect[0] == EXP_INJECT:
                        # the end of an implicit transaction whose plan and COMMIT were sent
                        # with it: the client's ReadyForQuery comes after them
                        run = self._flush_run(out, buf, run, start)
                        continue
                    tv = self.tview
                    if tv is not None and not expect and (
                            tv.wrapped or tv.reload_after or tv.in_block != (status != b"I")
                            or tv.db.active and (status != b"T" or tv.failed)):
                        # (a block opened or closed; inside one, only its failure matters)
                        # (followed even without TVIEWs: one may appear mid-transaction)
                        pre = tv.ready(self, status)
                        if pre:
                            run = self._flush_run(out, buf, run, start)
                            for batch in pre:
                                server.write(batch)
                                expect.append(EXP_INJECT)
                            self.tv_deferred = True
                            self.holding = self.tv_hold = True  # nothing runs before COMMIT
                            continue
                        if self.tview.hold_ready(self, status):
                            # the engine sends this ReadyForQuery itself, later (ddl_done)
                            run = self._flush_run(out, buf, run, start)
                            self.holding = True
                            if status == b"I" and self.pool.pool_mode != "session":
                                release = True
                            continue
                        if self.tv_hold:
                            self.tv_hold = False
                            self.holding = False
                            resume = True
                    if expect:
                        if type(expect[0]) is tuple:  # replies made up by the proxy come next
                            run = self._flush_run(out, buf, start if run < 0 else run, end)
                            self._emit_fakes(out)
                            continue
                    elif status == b"I" and self.pool.pool_mode != "session":
                        release = True
                elif head == EXP_PARAMS or head == EXP_SKIPQ:
                    run = self._flush_run(out, buf, run, start)
                    if mtype == 0x53:  # ParameterStatus: learn the canonical value, tell the client
                        self._parameter_status(server, bytes(buf[start + 5:end]))
                        out.append(bytes(buf[start:end]))
                    elif mtype == 0x45 and head == EXP_PARAMS:
                        self.param_error = D.error_fields(bytes(buf[start + 5:end]))
                    continue
                elif mtype == 0x45:  # ErrorResponse
                    self.copy_in = False
                    if type(head) is tuple or head == EXP_EXT or head == EXP_SKIP1:
                        # the server skips everything up to the next Sync: the client's, or
                        # the one of a plan that replaced it (_close_implicit)
                        while expect and expect[0] != EXP_SYNC:
                            if expect[0] == EXP_INJECT and self.tv_deferred:
                                self.inject_skipped = True
                                break
                            self._drop_head(error=True)
                        else:
                            # skipping up to a Sync the client has not sent yet
                            self.skip_to_sync = not expect
                elif mtype in TERMINALS:
                    if head == EXP_QUERY or head == EXP_SYNC:
                        if mtype == 0x43:
                            self._command_complete(server, buf, start, end)
                    else:
                        expect.popleft()
                        if mtype == 0x43:
                            self.copy_in = False
                            self._command_complete(server, buf, start, end)
                        if type(head) is tuple and head[0] == PARSE_NEW:
                            head[1].validated = True
                            if head[2]:
                                run = self._flush_run(out, buf, run, start)
                                self._emit_fakes(out)
                                continue
                        elif head == EXP_SKIP1:
                            run = self._flush_run(out, buf, run, start)
                            self._emit_fakes(out)
                            continue
                        if expect and type(expect[0]) is tuple:
                            if run < 0:
                                run = start
                            run = self._flush_run(out, buf, run, end)
                            self._emit_fakes(out)
                            continue
                elif mtype == 0x53:
                    self._parameter_status(server, bytes(buf[start + 5:end]))
                elif mtype == 0x47:  # CopyInResponse
                    self.copy_in = True
                if run < 0:
                    run = start
            if run >= 0:
                pos = framer.position
                out.append(buf[run:pos] if type(buf) is bytes else bytes(buf[run:pos]))
        except ProtocolError as exc:
            log.warning("server protocol error", server=server.id, error=exc.message)
            server.close()
            return
        if self.flush_release and not expect and not release:
            self.flush_release = False
            self.batch = 0
            server.write(B.SYNC)
            expect.append(EXP_SKIPQ)
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))
        if release:
            self._release_server()
            if self.framer.pending() and not self.holding:
                self._process_client()
        elif resume:
            if self.param_error is not None:
                err = self.param_error
                self.param_error = None
                self._release_server()
                self.fatal(err.get("C", "22023"), err.get("M", "invalid startup parameter"))
                return
            self._process_client()

    def _injected_reply(self, server: ServerConnection, head: object, mtype: int,
                        buf: bytes | bytearray, start: int, end: int, out: list[bytes]) -> int:
        """A reply to the engine's batch, or to the client's request after a batch failed (the
        batch's error then stands in for the request's outcome).  0: swallowed; 1: the client
        may go on; 2: the server is free."""
        expect = self.expect
        if head == EXP_INJECT:
            if mtype == 0x44:  # DataRow
                self.inject_rows.append(bytes(buf[start + 5:end]))
            elif mtype == 0x54:  # RowDescription, CommandComplete: for the engine's own talk
                self.inject_desc = bytes(buf[start + 5:end])
            elif mtype == 0x43:
                self.inject_tag = D.command_tag(bytes(buf[start + 5:end]))
            elif mtype == 0x45 and self.inject_batch_error is None:
                self.inject_batch_error = bytes(buf[start:end])
                if self.inject_error is None:
                    self.inject_error = self.inject_batch_error
            elif mtype == 0x53:
                self._parameter_status(server, bytes(buf[start + 5:end]))
                out.append(bytes(buf[start:end]))
            elif mtype == 0x4E:  # NoticeResponse: the client sees the engine's warnings
                out.append(bytes(buf[start:end]))
            if mtype != 0x5A:
                return 0
            status = buf[start + 5:start + 6]
            server.status = status
            expect.popleft()
            own = self.inject_batch_error
            self.inject_batch_error = None
            skipped, self.inject_skipped = self.inject_skipped, False
            if self.tview is not None:
                fields = D.error_fields(own[5:]) if own is not None else None
                if fields is None and skipped:  # the client's statement failed before it
                    fields = {"C": "25P02", "M": "skipped after the client's error"}
                if self.tview.injected(self.inject_rows, fields) and own is self.inject_error:
                    self.inject_error = None  # the engine's own affair (an audit)
            error = self.inject_error
            self.inject_rows = []
            self.inject_desc = self.inject_tag = None
            if expect and expect[0] == EXP_INJECT:
                return 0
            if error is None and expect and type(expect[0]) is tuple:
                self._emit_fakes(out)  # e.g. ParseComplete of a statement the server knows
            if self.tv_deferred and not expect:
                # the transaction the proxy opened is closed: now the client's ReadyForQuery
                self.tv_deferred = False
                if error is not None:
                    out.append(error)
                    self.inject_error = None
                out.append(B.ready_for_query(status))
                self.tv_hold = False
                self.holding = False
                if status == b"I" and self.pool.pool_mode != "session":
                    return 2
                return 1
            return 0
        # the client's own request after a failed batch: its replies give way to the error
        if mtype == 0x5A:
            status = buf[start + 5:start + 6]
            server.status = status
            while expect and expect[0] != EXP_QUERY and expect[0] != EXP_SYNC:
                self._drop_head(error=True)
            if expect:
                expect.popleft()
            if self.tv_deferred and expect and expect[0] == EXP_INJECT:
                return 0  # the closing plan and COMMIT follow: the error comes after them
            out.append(self.inject_error)  # type: ignore[arg-type]
            self.inject_error = None
            if self.tview is not None and not expect:
                self.tview.ready(self, status)
            out.append(B.ready_for_query(status))
            if self.tv_hold:
                self.tv_hold = False
                self.holding = False
            if not expect and status == b"I" and self.pool.pool_mode != "session":
                return 2
            return 1
        if mtype in TERMINALS and expect and expect[0] != EXP_QUERY and expect[0] != EXP_SYNC:
            self._drop_head(error=True)
        return 0

    def _strip_reply(self, head: StripReply, mtype: int, buf: bytes | bytearray, start: int,
                     end: int, out: list[bytes]) -> bool:
        """RowDescription/DataRow of a rewritten statement, without the appended columns (the
        appended values go to the engine).  True: the message ended a Describe."""
        rw = head.rewrite  # type: ignore[attr-defined]
        tv = self.tview
        assert tv is not None
        if mtype == 0x54:
            desc = strip_row_description(buf[start + 5:end], rw.n_extra)
            if desc is not None:
                out.append(desc)
            elif head.describe:  # type: ignore[attr-defined]
                out.append(B.NO_DATA)  # the client's statement returns no rows
            if head.describe:  # type: ignore[attr-defined]
                tv.returning_described(head)
                return True
            return False
        if mtype == 0x44:
            if rw.n_extra == 1 and not rw.client_columns and end - start >= 11 \
                    and buf[start + 5] == 0 and buf[start + 6] == 1:
                # one value, the appended one: nothing goes to the client
                size = int.from_bytes(buf[start + 7:start + 11], "big", signed=True)
                if size == end - start - 11:
                    tv.returned_key(head, bytes(buf[start + 11:end]))
                    return False
                if size == -1 and end - start == 11:
                    return False  # NULL: no key
            total = message_length(buf, start)
            if end - start < total:  # streamed in pieces: strip it once whole
                self.strip_row = bytearray(buf[start:end])
                self.strip_len = total
                return False
            body = bytes(buf[start + 5:end])
        else:
            part = self.strip_row
            assert part is not None
            part += buf[start:end]
            if len(part) < self.strip_len:
                return False
            self.strip_row = None
            body = bytes(part[5:])
        row, extra = split_data_row(body, rw.n_extra)
        tv.returned(head, extra)
        if row is not None:
            out.append(row)
        return False

    def _drop_head(self, error: bool = False) -> None:
        head = self.expect.popleft()
        if type(head) is tuple and head[0] == PARSE_NEW and error:
            stmt = head[1]
            if self.server is not None:
                self.server.prepared.pop(stmt.server_name, None)
            name = head[3]
            if name is not None and self.prepared.get(name) is stmt:
                # as in PostgreSQL, a Parse that failed leaves no statement behind
                del self.prepared[name]
                self.proxy.prepared.release(stmt)

    def _emit_fakes(self, out: list[bytes]) -> None:
        expect = self.expect
        while expect and type(expect[0]) is tuple and expect[0][0] == FAKE:
            out.append(expect.popleft()[1])

    def _command_complete(self, server: ServerConnection, buf: bytes | bytearray, start: int,
                          end: int) -> None:
        tag = bytes(buf[start + 5:start + 19])
        if tag.startswith((b"DISCARD ALL", b"DEALLOCATE")):
            server.engine_statements.clear()
        if tag.startswith((b"DISCARD ALL", b"RESET")):
            # settings went back to the server's defaults; forget what the proxy had set
            for key in server.params_set - server.login_params.keys():
                server.params.pop(key, None)
            server.param_sig = None
        if tag.startswith((b"DISCARD ALL", b"DEALLOCATE ALL")):
            server.prepared.clear()
            for stmt in self.prepared.values():
                self.proxy.prepared.release(stmt)
            self.prepared.clear()

    def _parameter_status(self, server: ServerConnection, body: bytes) -> None:
        key, value = D.parameter_status(body)
        server.params[key] = value
        if key in self.params or key in P.REPORTED_TRACKED:
            server.params_set.add(key)  # the client changed it: put it back for the next one
            if self.params.get(key) != value:
                self.params[key] = value
                self._params_changed()
            server.param_sig = self.param_sig

    # --- endings ---------------------------------------------------------------------------

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            self.expect.clear()
            self.holding = False
            self.fatal("08006", "server conn crashed?",
                       "the server connection was closed while this client was using it")

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._disconnect()

    def _disconnect(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ready = False
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.waiting and self.pool is not None:
            self.pool.forget_waiter(self)
        self.waiting = False
        if self._paused_server is not None:
            self.resume_writing()
        server = self.server
        if server is not None and self.pool is not None:
            self.server = None
            if server.closed:
                pass
            elif self.expect or self.copy_in:
                server.close()  # a request is in flight: its state is unknown
            elif self.pool.pool_mode == "session":
                self.pool.cleanup(server, self.proxy.cfg.proxy.server_reset_query or "DISCARD ALL")
            elif server.status != b"I":
                self.pool.cleanup(server, "ROLLBACK")
            else:
                self.pool.release(server)
        for stmt in self.prepared.values():
            self.proxy.prepared.release(stmt)
        self.prepared.clear()
        self.proxy.client_gone(self)
        if self.user:
            log.info("client closed", client=self.id, user=self.user, database=self.database)

    # --- introspection for the admin console -----------------------------------------------

    @property
    def state(self) -> str:
        if not self.ready:
            return "login"
        if self.waiting:
            return "waiting"
        if self.server is not None:
            return "active"
        return "idle"

