"""The proxy process: listener, pools, clients, cancel routing, janitor, signals, reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time

from tvproxy import __version__
from tvproxy.auth import UserlistError, load_userlist, secret_kind
from tvproxy.config import Config, ConfigError, DatabaseConfig, load_config
from tvproxy.log import get_logger
from tvproxy.pool.pool import Pool
from tvproxy.session.client import ClientSession
from tvproxy.session.prepared import PreparedRegistry
from tvproxy.stats import Stats
from tvproxy.tview.engine import TviewEngine

log = get_logger("tvproxy.server")


class ProxyServer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set[ClientSession] = set()
        self.cancel_keys: dict[tuple[int, int], ClientSession] = {}
        self.prepared = PreparedRegistry()
        self.tviews: TviewEngine | None = TviewEngine(self) if cfg.tview.enabled else None
        self.userlist: dict[str, str] = self._load_userlist(cfg)
        self.paused_dbs: set[str] = set()
        self.disabled_dbs: set[str] = set()
        self.paused_all = False
        self.suspended = False
        self.started = time.time()
        self.listeners: list[asyncio.AbstractServer] = []
        self.stopping: asyncio.Future[int] | None = None
        self.shutdown_mode: str | None = None
        self._janitor: asyncio.Task | None = None
        self._last_roll = time.monotonic()
        self._param_sigs: dict[tuple, tuple] = {}
        self._idle_tx: dict[int, tuple[tuple[int, int], float]] = {}  # client id -> (input mark, since)

    def reload_userlist(self) -> None:
        """Re-read ``auth_file`` (raises ConfigError and keeps the old list on failure)."""
        self.userlist = self._load_userlist(self.cfg)

    @staticmethod
    def _load_userlist(cfg: Config) -> dict[str, str]:
        if not cfg.auth.auth_file:
            return {}
        try:
            return load_userlist(cfg.auth.auth_file)
        except OSError as exc:
            raise ConfigError(cfg.path or "<config>", "auth.auth_file",
                              f"cannot read {cfg.auth.auth_file}: {exc.strerror}") from exc
        except UserlistError as exc:
            raise ConfigError(cfg.path or "<config>", "auth.auth_file", str(exc)) from exc

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        p = self.cfg.proxy
        hosts = [h.strip() for h in p.listen_addr.split(",") if h.strip()]
        hosts = [None if h == "*" else h for h in hosts]
        for host in hosts:
            srv = await loop.create_server(
                lambda: ClientSession(self), host, p.listen_port, backlog=p.listen_backlog,
                reuse_address=True, reuse_port=p.workers > 1 or None,
            )
            self.listeners.append(srv)
        if p.unix_socket_dir:
            path = os.path.join(p.unix_socket_dir, f".s.PGSQL.{p.listen_port}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.listeners.append(await loop.create_unix_server(lambda: ClientSession(self), path))
        for srv in self.listeners:
            for sock in srv.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._janitor = loop.create_task(self._janitor_loop())
        if self.tviews is not None:
            # in the background: signals and clients are served while catalogs load
            self._tview_start = loop.create_task(self.tviews.start())
        log.info("listening", addr=p.listen_addr, port=p.listen_port, pool_mode=p.pool_mode,
                 databases=sorted(self.cfg.databases))

    def close_listeners(self) -> None:
        for srv in self.listeners:
            srv.close()
        self.listeners.clear()

    def request_stop(self, code: int = 0) -> None:
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(code)

    def shutdown(self, mode: str | None = None) -> None:
        """SHUTDOWN (now), WAIT_FOR_CLIENTS or WAIT_FOR_SERVERS."""
        if mode is None or self.shutdown_mode is not None:
            self.request_stop(0)
            return
        self.shutdown_mode = mode
        self.close_listeners()
        log.info("shutting down", mode=mode)
        self.check_shutdown()

    def check_shutdown(self) -> None:
        mode = self.shutdown_mode
        if mode is None:
            return
        clients = [c for c in self.clients if c.admin is None]
        if mode == "WAIT_FOR_CLIENTS" and not clients or mode == "WAIT_FOR_SERVERS" and not any(
            c.server is not None for c in clients
        ):
            self.request_stop(0)

    def close_everything(self) -> None:
        for client in list(self.clients):
            client.fatal("57P01", "pooler is shutting down")
        for pool in self.pools.values():
            pool.close_all()

    # --- clients ---------------------------------------------------------------------------

    def client_connected(self, client: ClientSession) -> None:
        self.clients.add(client)

    def client_gone(self, client: ClientSession) -> None:
        self.clients.discard(client)
        self._idle_tx.pop(client.id, None)
        key = (client.pid, client.secret)
        if self.cancel_keys.get(key) is client:
            del self.cancel_keys[key]
        if self.shutdown_mode is not None:
            self.check_shutdown()

    def admit_client(self, client: ClientSession) -> bool:
        return len(self.clients) <= self.cfg.proxy.max_client_conn

    def intern_params(self, sig: tuple) -> tuple:
        return self._param_sigs.setdefault(sig, sig)

    def is_admin_user(self, user: str) -> bool:
        return user in self.cfg.admin.admin_users or user in self.cfg.admin.stats_users

    def user_secret(self, user: str) -> str | None:
        return self.userlist.get(user)

    def admin_welcome(self) -> dict[str, str]:
        return {
            "server_version": f"15.0 (tvproxy {__version__})", "server_encoding": "UTF8",
            "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "TimeZone": "UTC",
            "integer_datetimes": "on", "standard_conforming_strings": "on",
            "application_name": "", "IntervalStyle": "postgres", "is_superuser": "off",
        }

    # --- cancel ----------------------------------------------------------------------------

    def register_cancel_key(self, client: ClientSession) -> None:
        while (client.pid, client.secret) in self.cancel_keys:
            client.secret = (client.secret + 1) & 0xFFFFFFFF
        self.cancel_keys[(client.pid, client.secret)] = client

    def forward_cancel(self, pid: int, secret: int) -> None:
        client = self.cancel_keys.get((pid, secret))
        if client is None or client.server is None:
            return  # unknown key, or the client is not running anything: nothing to cancel
        asyncio.get_running_loop().create_task(client.server.cancel_query(client))

    # --- pools -----------------------------------------------------------------------------

    def get_pool(self, database: str, user: str) -> Pool:
        db = self.cfg.databases[database]
        server_user = db.user or user
        key = (database, server_user)
        pool = self.pools.get(key)
        if pool is None or pool.db is not db:
            password = db.password
            if not password:
                secret = self.userlist.get(server_user)
                if secret is not None and secret_kind(secret) == "plain":
                    password = secret
            if pool is None:
                pool = Pool(self, db, server_user, password)
                self.pools[key] = pool
            else:
                pool.db, pool.password = db, password
        return pool

    def db_connection_count(self, database: str) -> int:
        return sum(p.total() for (d, _), p in self.pools.items() if d == database)

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_dbs

    def pause(self, database: str | None = None) -> None:
        if database is None:
            self.paused_all = True
        else:
            self.paused_dbs.add(database)
        for (d, _), pool in self.pools.items():
            if database is None or d == database:
                pool.close_all(only_idle=True)

    def resume(self, database: str | None = None) -> None:
        if database is None:
            self.paused_all = False
            self.paused_dbs.clear()
            self.suspended = False
        else:
            self.paused_dbs.discard(database)
        for pool in self.pools.values():
            for server in list(pool.idle):
                pool.idle.remove(server)
                pool.release(server)
            pool._maybe_open_for_waiters()

    def reconnect(self, database: str | None = None) -> None:
        for (d, _), pool in self.pools.items():
            if database is None or d == database:
                pool.close_all(only_idle=True)

    def kill(self, database: str | None = None) -> None:
        for client in list(self.clients):
            if client.admin is None and (database is None or client.database == database):
                client.fatal("08P01", "admin console KILL")
        for (d, _), pool in self.pools.items():
            if database is None or d == database:
                pool.close_all()
        if database is not None:
            self.paused_dbs.add(database)
        else:
            self.paused_all = True

    # --- reload ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file; a bad file keeps the running config (raises ConfigError)."""
        if not self.cfg.path:
            raise ConfigError("<config>", "", "no config file to reload")
        new = load_config(self.cfg.path)
        userlist = self._load_userlist(new)
        old = self.cfg
        self.apply_config(new)
        self.userlist = userlist
        for warning in new.warnings:
            log.warning("config", warning=warning)
        log.info("config reloaded", path=new.path, changed_databases=sorted(
            n for n in set(old.databases) | set(new.databases)
            if old.databases.get(n) != new.databases.get(n)))

    def apply_config(self, new: Config) -> None:
        old = self.cfg
        self.cfg = new
        for (name, _user), pool in list(self.pools.items()):
            newdb: DatabaseConfig | None = new.databases.get(name)
            if newdb is None or _conn_changed(old.databases.get(name), newdb):
                pool.close_all(only_idle=True)
                if newdb is None:
                    continue
            if newdb is not None:
                pool.db = newdb

    # --- janitor ---------------------------------------------------------------------------

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self.maintain(time.monotonic())
            except Exception:  # noqa: BLE001 - the janitor must survive anything
                log.exception("janitor failed")

    def maintain(self, now: float) -> None:
        # as PgBouncer: a database with a forced user keeps min_pool_size from the start
        for name, db in self.cfg.databases.items():
            if db.user and (db.min_pool_size or self.cfg.proxy.min_pool_size) and (
                (name, db.user) not in self.pools
            ):
                self.get_pool(name, db.user)
        for pool in list(self.pools.values()):
            pool.maintain(now)
        p = self.cfg.proxy
        for client in list(self.clients):
            if not client.ready:
                if client.admin is None and p.client_login_timeout and (
                    now - client.login_started > p.client_login_timeout
                ):
                    client.fatal("08P01", "client_login_timeout")
                continue
            server = client.server
            if server is not None and p.idle_transaction_timeout and not client.expect and (
                server.status != b"I"
            ):
                mark = (client.framer.position, len(client.framer.buffer))
                seen = self._idle_tx.get(client.id)
                if seen is None or seen[0] != mark:
                    self._idle_tx[client.id] = (mark, now)
                elif now - seen[1] > p.idle_transaction_timeout:
                    self._idle_tx.pop(client.id, None)
                    client.fatal("25P03", "idle transaction timeout")
                continue
            self._idle_tx.pop(client.id, None)
            if server is None and p.client_idle_timeout and client.admin is None and (
                now - client.idle_since > p.client_idle_timeout
            ):
                client.fatal("08P01", "client_idle_timeout")
        if now - self._last_roll >= p.stats_period:
            self.stats.roll(now - self._last_roll)
            self._last_roll = now


def _conn_changed(old: DatabaseConfig | None, new: DatabaseConfig) -> bool:
    if old is None:
        return True
    return (old.host, old.port, old.dbname, old.user, old.password) != (
        new.host, new.port, new.dbname, new.user, new.password)


async def _serve(cfg: Config) -> int:
    proxy = ProxyServer(cfg)
    loop = asyncio.get_running_loop()
    proxy.stopping = loop.create_future()
    await proxy.start()
    signals_seen: dict[int, int] = {}

    def on_signal(sig: int) -> None:
        signals_seen[sig] = signals_seen.get(sig, 0) + 1
        if sig == signal.SIGHUP:
            try:
                proxy.reload()
            except ConfigError as exc:
                log.error("reload failed, keeping the running config", error=str(exc))
            return
        if sig == signal.SIGQUIT or signals_seen[sig] > 1 or proxy.shutdown_mode is not None:
            proxy.request_stop(0)
            return
        proxy.shutdown("WAIT_FOR_CLIENTS" if sig == signal.SIGTERM else "WAIT_FOR_SERVERS")

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)
    code = await proxy.stopping
    proxy.close_listeners()
    proxy.close_everything()
    if proxy._janitor is not None:
        proxy._janitor.cancel()
    await asyncio.sleep(0.05)
    log.info("stopped")
    return code


def run_server(cfg: Config) -> int:
    """Run the proxy until it is shut down; returns the process exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; fall back if absent
        return asyncio.run(_serve(cfg))
    return uvloop.run(_serve(cfg))
