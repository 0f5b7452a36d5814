"""One upstream PostgreSQL connection: login, then a thin relay to the linked client session."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from tvproxy.auth.md5 import md5_response
from tvproxy.auth.scram import ScramClient, ScramError
from tvproxy.protocol import Framer, ProtocolError
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D

if TYPE_CHECKING:
    from tvproxy.pool.pool import Pool
    from tvproxy.session.client import ClientSession

_ids = itertools.count(1)


class ServerLoginError(Exception):
    """The upstream refused or failed the login; carries PostgreSQL's error fields."""

    def __init__(self, message: str, sqlstate: str = "08006", fields: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.fields = fields or {}


class ServerConnection(asyncio.Protocol):
    """An upstream connection. After login, bytes go straight to the linked session."""

    def __init__(self, pool: Pool) -> None:
        self.id = next(_ids)
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.framer = Framer()
        self.client: ClientSession | None = None
        self.params: dict[str, str] = {}
        self.login_params: dict[str, str] = {}
        self.params_set: set[str] = set()
        self.param_sig: tuple | None = None
        self.pid = 0
        self.secret = 0
        self.connect_time = time.time()
        self.created = time.monotonic()
        self.last_used = self.created
        self.link_time = 0.0
        self.closed = False
        self.logged_in = False
        self.close_needed = False
        self.needs_check = False
        self.cancels = 0  # CancelRequests in flight for this server
        self.parked = False  # released while a cancel was in flight: waits for it
        self.status = b"I"
        # client-independent server-side prepared statements: server name -> None (LRU order)
        self.prepared: OrderedDict[bytes, None] = OrderedDict()
        self.engine_statements: set[bytes] = set()  # the TVIEW engine's refresh statements
        self.addr = ("", 0)
        self.local_addr = ("", 0)
        # login phase
        self._login_waiter: asyncio.Future[None] | None = None
        self._login_queue: list[tuple[int, bytes]] = []
        # cleanup phase (ROLLBACK / reset query owned by no client): swallow until ReadyForQuery
        self._cleanup = False
        self._paused_client: ClientSession | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.addr = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else (str(peer), 0)
        self.local_addr = (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else (str(sock), 0)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.server_data(self, data)
            return
        try:
            self.framer.feed(data)
            while (m := self.framer.next()) is not None:
                mtype, start, end = m
                body = bytes(self.framer.buffer[start + 5:end])
                if not self.logged_in:
                    self._login_queue.append((mtype, body))
                    self._wake()
                else:
                    self._idle_message(mtype, body)
        except ProtocolError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self._wake()
        self.pool.server_lost(self)
        client = self.client
        if client is not None:
            self.client = None
            client.server_lost(self)

    def pause_writing(self) -> None:
        # the server is not keeping up (e.g. a big COPY FROM): stop reading from its client
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.pause_reading()
            self._paused_client = client

    def resume_writing(self) -> None:
        # the client that was paused is resumed even if it has been unlinked meanwhile
        client = self._paused_client
        self._paused_client = None
        if client is not None and client.transport is not None and not client.closed:
            client.transport.resume_reading()

    # --- login -----------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._login_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _recv(self) -> tuple[int, bytes]:
        while not self._login_queue:
            if self.closed:
                raise ServerLoginError("server closed the connection unexpectedly")
            self._login_waiter = asyncio.get_running_loop().create_future()
            await self._login_waiter
            self._login_waiter = None
        return self._login_queue.pop(0)

    async def login(self, user: str, dbname: str, password: str) -> None:
        assert self.transport is not None
        self.transport.write(B.startup_message({"user": user, "database": dbname}))
        scram: ScramClient | None = None
        while True:
            mtype, body = await self._recv()
            if mtype == 0x52:  # 'R'
                code, data = D.auth_request(body)
                if code == 0:
                    continue
                if code in (3, 5, 10) and not password:
                    raise ServerLoginError(
                        f'server requested a password for user "{user}" but none is configured',
                        "28P01")
                if code == 3:
                    self.transport.write(B.password_message(password.encode() + b"\x00"))
                elif code == 5:
                    self.transport.write(B.password_message(md5_response(user, password, data) + b"\x00"))
                elif code == 10:
                    if "SCRAM-SHA-256" not in D.sasl_mechanisms(data):
                        raise ServerLoginError("server offered no supported SASL mechanism", "28000")
                    scram = ScramClient(password)
                    self.transport.write(B.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == 11 and scram is not None:
                    try:
                        self.transport.write(B.sasl_response(scram.handle_server_first(data)))
                    except ScramError as exc:
                        raise ServerLoginError(str(exc), "28000") from exc
                elif code == 12 and scram is not None:
                    try:
                        scram.verify_server_final(data)
                    except ScramError as exc:
                        raise ServerLoginError(str(exc), "28000") from exc
                else:
                    raise ServerLoginError(f"unsupported authentication method {code} requested by server", "28000")
            elif mtype == 0x45:  # 'E'
                f = D.error_fields(body)
                raise ServerLoginError(f.get("M", "server login failed"), f.get("C", "08006"), f)
            elif mtype == 0x53:  # 'S'
                k, v = D.parameter_status(body)
                self.params[k] = v
            elif mtype == 0x4B:  # 'K'
                self.pid, self.secret = D.backend_key(body)
            elif mtype == 0x5A:  # 'Z'
                if self.pid == 0:
                    self.pid = -1
                self.logged_in = True
                self.login_params = dict(self.params)
                return
            # NoticeResponse and NegotiateProtocolVersion during login are ignored

    # --- idle / cleanup --------------------------------------------------------------------

    def _idle_message(self, mtype: int, body: bytes) -> None:
        if mtype == 0x53:
            k, v = D.parameter_status(body)
            self.params[k] = v
        elif mtype == 0x45:
            if self._cleanup:
                return
            self.close()  # FATAL while idle (admin shutdown, terminate): drop it
        elif mtype == 0x5A and self._cleanup:
            self._cleanup = False
            self.status = body[:1]
            if self.status == b"I":
                self.pool.release(self)
            else:
                self.close()

    def cleanup_and_release(self, sql: str) -> None:
        """Run ``sql`` owned by no client (ROLLBACK, reset query), then return to the pool."""
        self.client = None
        self.needs_check = False
        self._cleanup = True
        self.prepared_invalidate_if(sql)
        self.write(B.query(sql))

    def prepared_invalidate_if(self, sql: str) -> None:
        up = sql.upper()
        if "DISCARD ALL" in up or "DEALLOCATE ALL" in up:
            self.prepared.clear()
            self.engine_statements.clear()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            try:
                self.transport.write(B.TERMINATE)
            except Exception:  # noqa: BLE001 - the socket may already be gone
                pass
            self.transport.close()
        self.closed = True

    async def cancel_query(self, for_client: ClientSession) -> None:
        """Send a CancelRequest with this server's real key over a new connection.

        While a cancel is in flight the server is not handed to anyone else (see
        ``Pool.release``), and it is sent only if the server still runs ``for_client``'s work,
        so a late cancel can never hit the next client's query.
        """
        if self.pid <= 0 or self.client is not for_client:
            return
        self.cancels += 1
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.pool.db.host, self.pool.db.port), 5)
            if self.client is for_client and not self.closed:
                writer.write(B.cancel_request(self.pid, self.secret))
                await writer.drain()
                # PostgreSQL closes the connection once it has signalled the backend
                await asyncio.wait_for(reader.read(), 5)
        except (TimeoutError, OSError):
            pass
        finally:
            if writer is not None:
                writer.close()
            self.cancels -= 1
            if self.cancels == 0 and self.parked:
                self.parked = False
                self.pool.release(self)
