"""Server connections of one (database, user): checkout/checkin, limits, lifetime, healing."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from tvproxy.log import get_logger
from tvproxy.pool.server import ServerConnection, ServerLoginError

if TYPE_CHECKING:
    from tvproxy.config import DatabaseConfig
    from tvproxy.server import ProxyServer
    from tvproxy.session.client import ClientSession

log = get_logger("tvproxy.pool")

WELCOME_KEYS = (
    "server_version", "server_encoding", "client_encoding", "DateStyle", "IntervalStyle",
    "TimeZone", "integer_datetimes", "standard_conforming_strings", "application_name",
    "is_superuser", "session_authorization", "default_transaction_read_only", "in_hot_standby",
    "scram_iterations",
)


class Pool:
    def __init__(self, proxy: ProxyServer, db: DatabaseConfig, user: str, password: str) -> None:
        self.proxy = proxy
        self.db = db
        self.user = user
        self.password = password
        self.idle: deque[ServerConnection] = deque()
        self.active: set[ServerConnection] = set()
        self.cleaning: set[ServerConnection] = set()
        self.canceling: set[ServerConnection] = set()
        self.connecting = 0
        self.waiters: deque[ClientSession] = deque()
        self.welcome: dict[str, str] | None = None
        self._welcome_waiters: list[asyncio.Future[None]] = []
        self.login_error: ServerLoginError | None = None
        self.login_error_at = 0.0
        self.stats = proxy.stats.for_db(db.name)
        self.last_lifetime_kill = 0.0

    # --- sizes -----------------------------------------------------------------------------

    @property
    def pool_mode(self) -> str:
        return self.db.pool_mode or self.proxy.cfg.proxy.pool_mode

    @property
    def pool_size(self) -> int:
        size = self.db.pool_size
        return self.proxy.cfg.proxy.default_pool_size if size is None else size

    @property
    def min_pool_size(self) -> int:
        size = self.db.min_pool_size
        return self.proxy.cfg.proxy.min_pool_size if size is None else size

    @property
    def reserve_pool_size(self) -> int:
        size = self.db.reserve_pool_size
        return self.proxy.cfg.proxy.reserve_pool_size if size is None else size

    def total(self) -> int:
        return (len(self.idle) + len(self.active) + len(self.cleaning) + len(self.canceling)
                + self.connecting)

    def _may_open(self, reserve: bool = False) -> bool:
        limit = self.pool_size + (self.reserve_pool_size if reserve else 0)
        if limit and self.total() >= limit:
            return False
        max_db = self.db.max_db_connections or self.proxy.cfg.proxy.max_db_connections
        return not (max_db and self.proxy.db_connection_count(self.db.name) >= max_db)

    @property
    def paused(self) -> bool:
        return self.proxy.is_paused(self.db.name)

    # --- checkout / checkin ----------------------------------------------------------------

    def checkout(self, client: ClientSession) -> ServerConnection | None:
        """Hand out an idle server synchronously, or queue the client (returns None)."""
        if not self.paused:
            idle = self.idle
            while idle:
                server = idle.pop()
                if server.closed:
                    continue
                if server.needs_check:  # idle for server_check_delay: test it before use
                    self.cleanup(server, self.proxy.cfg.proxy.server_check_query or ";")
                    continue
                self.active.add(server)
                return server
        client.wait_started = time.monotonic()
        self.waiters.append(client)
        if not self.paused:
            self._maybe_open_for_waiters()
        return None

    def forget_waiter(self, client: ClientSession) -> None:
        try:
            self.waiters.remove(client)
        except ValueError:
            pass

    def release(self, server: ServerConnection) -> None:
        """A server is clean and idle: give it to the next waiter or park it."""
        self.active.discard(server)
        self.cleaning.discard(server)
        server.client = None
        if server.cancels and not server.closed:
            server.parked = True  # being canceled: comes back when the cancel is done
            self.canceling.add(server)
            return
        self.canceling.discard(server)
        if server.closed:
            self._maybe_open_for_waiters()
            return
        now = time.monotonic()
        lifetime = self.proxy.cfg.proxy.server_lifetime
        if server.close_needed or (lifetime and now - server.created > lifetime):
            server.close()
            self._maybe_open_for_waiters()
            return
        server.last_used = now
        while self.waiters and not self.paused:
            client = self.waiters.popleft()
            if client.closed:
                continue
            self.active.add(server)
            client.assign_server(server)
            return
        self.idle.append(server)

    def cleanup(self, server: ServerConnection, sql: str) -> None:
        self.active.discard(server)
        self.cleaning.add(server)
        server.cleanup_and_release(sql)

    def server_lost(self, server: ServerConnection) -> None:
        log.info("server closed", database=self.db.name, user=self.user, server=server.id,
                 backend_pid=server.pid, linked=server.client is not None)
        self.active.discard(server)
        self.cleaning.discard(server)
        self.canceling.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        self._maybe_open_for_waiters()

    # --- opening ---------------------------------------------------------------------------

    def _maybe_open_for_waiters(self) -> None:
        if not self.waiters or self.paused:
            return
        now = time.monotonic()
        pending = (len(self.waiters) - self.connecting - len(self.cleaning)
                   - len(self.canceling))
        reserve_after = self.proxy.cfg.proxy.reserve_pool_timeout
        while pending > 0:
            oldest_wait = now - self.waiters[0].wait_started
            use_reserve = self.reserve_pool_size > 0 and oldest_wait >= reserve_after
            if not self._may_open(reserve=use_reserve):
                break
            if use_reserve and self.total() >= self.pool_size:
                log.info("taking connection from reserve_pool", database=self.db.name, user=self.user)
            self.open_server()
            pending -= 1

    def open_server(self) -> None:
        if self.login_error is not None and (
            time.monotonic() - self.login_error_at < self.proxy.cfg.proxy.server_login_retry
        ):
            self._fail_waiters(self.login_error)
            return
        self.connecting += 1
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.proxy.cfg.proxy
        server: ServerConnection | None = None
        try:
            try:
                _, server = await asyncio.wait_for(
                    loop.create_connection(lambda: ServerConnection(self), self.db.host, self.db.port),
                    cfg.server_connect_timeout or None,
                )
            except TimeoutError as exc:
                raise ServerLoginError(
                    f"server connect timeout ({self.db.host}:{self.db.port})") from exc
            except OSError as exc:
                raise ServerLoginError(
                    f"could not connect to server {self.db.host}:{self.db.port}: {exc.strerror or exc}") from exc
            await asyncio.wait_for(
                server.login(self.user, self.db.dbname or self.db.name, self.password),
                cfg.server_connect_timeout or None,
            )
        except (TimeoutError, ServerLoginError, OSError) as exc:
            self.connecting -= 1
            if server is not None:
                server.close()
            err = exc if isinstance(exc, ServerLoginError) else ServerLoginError(
                "server login timeout" if isinstance(exc, asyncio.TimeoutError) else str(exc))
            self.login_error = err
            self.login_error_at = time.monotonic()
            log.warning("server login failed", database=self.db.name, user=self.user,
                        error=err.message, sqlstate=err.sqlstate)
            self._fail_waiters(err)
            self._wake_welcome()
            return
        self.connecting -= 1
        self.login_error = None
        self.proxy.stats.servers_opened += 1
        log.info("server connected", database=self.db.name, user=self.user, server=server.id,
                 backend_pid=server.pid)
        if self.welcome is None:
            self.welcome = {k: v for k, v in server.params.items() if k in WELCOME_KEYS}
        self._wake_welcome()
        if server.closed:
            return
        self.release(server)

    def _fail_waiters(self, err: ServerLoginError) -> None:
        waiters, self.waiters = self.waiters, deque()
        for client in waiters:
            client.fail_waiting(err)

    def _wake_welcome(self) -> None:
        for fut in self._welcome_waiters:
            if not fut.done():
                fut.set_result(None)
        self._welcome_waiters.clear()

    async def get_welcome(self) -> dict[str, str]:
        """Parameters to greet a client with, from the pool's first server login."""
        if self.welcome is not None:
            return self.welcome
        fut = asyncio.get_running_loop().create_future()
        self._welcome_waiters.append(fut)
        if self.connecting == 0 and self.total() == 0:
            self.login_error = None if (
                time.monotonic() - self.login_error_at >= self.proxy.cfg.proxy.server_login_retry
            ) else self.login_error
            if self.login_error is not None:
                raise self.login_error
            self.open_server()
        await fut
        if self.welcome is None:
            raise self.login_error or ServerLoginError("server login failed")
        return self.welcome

    # --- janitor ---------------------------------------------------------------------------

    def maintain(self, now: float) -> None:
        cfg = self.proxy.cfg.proxy
        # idle servers: idle timeout and lifetime, keeping min_pool_size
        if self.idle:
            keep: deque[ServerConnection] = deque()
            for server in self.idle:
                too_old = cfg.server_lifetime and now - server.created > cfg.server_lifetime
                too_idle = (cfg.server_idle_timeout and now - server.last_used > cfg.server_idle_timeout
                            and self.total() > self.min_pool_size)
                if server.closed:
                    continue
                if too_old or too_idle or server.close_needed:
                    server.close()
                else:
                    if cfg.server_check_delay and now - server.last_used > cfg.server_check_delay:
                        server.needs_check = True
                    keep.append(server)
            self.idle = keep
        # clients waiting too long
        qwt = cfg.query_wait_timeout
        if qwt and self.waiters:
            while self.waiters and now - self.waiters[0].wait_started > qwt:
                client = self.waiters.popleft()
                client.fail_waiting(ServerLoginError("query_wait_timeout", "08P01"))
        if self.waiters:
            self._maybe_open_for_waiters()
        # min_pool_size
        if not self.paused and self.min_pool_size and self.login_error is None:
            while self.total() < self.min_pool_size and self._may_open():
                self.open_server()

    def close_all(self, only_idle: bool = False) -> None:
        for server in list(self.idle):
            server.close()
        self.idle.clear()
        if only_idle:
            for server in self.active:
                server.close_needed = True
            return
        for server in [*self.active, *self.cleaning, *self.canceling]:
            server.close()
