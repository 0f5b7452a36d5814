"""Operations: `tvproxy serve` with the minimal config, SIGHUP reload (good and bad files),
SIGTERM/SIGINT/SIGQUIT shutdown semantics, environment overrides.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyProcess, free_port, wait_until


def parallel_backends(proxy: Any, n: int = 3, sleep: float = 0.3) -> int:
    """Distinct backends serving ``n`` concurrent sleeping clients (= effective pool size)."""

    async def one(conn: psycopg.AsyncConnection) -> int:
        cur = await conn.execute(f"SELECT pg_backend_pid() FROM pg_sleep({sleep})")
        return (await cur.fetchone())[0]  # type: ignore[index]

    async def run() -> int:
        conns = [await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
                 for _ in range(n)]
        try:
            pids = await asyncio.wait_for(asyncio.gather(*(one(c) for c in conns)), 20)
        finally:
            for c in conns:
                await c.close()
        return len(set(pids))

    return asyncio.run(run())


def refused(proxy: Any) -> bool:
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=1):
            return False
    except OSError:
        return True


def show_config(proxy: Any) -> dict[str, str]:
    """SHOW CONFIG over psql on the admin console: key -> value."""
    r = subprocess.run(
        ["psql", "-X", "-At", "-F", "|",
         f"host={proxy.host} port={proxy.port} dbname=pgbouncer user=postgres", "-c", "SHOW CONFIG"],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split("|")
        out[parts[0]] = parts[1]
    return out


# --------------------------------------------------------------------------------------------
# serve with the minimal config from the issue


MINIMAL = """\
[proxy]
listen_addr = "127.0.0.1"
listen_port = {listen_port}
pool_mode = "transaction"
default_pool_size = 20
max_client_conn = 1000
[auth]
auth_type = "trust"          # trust | md5 | scram-sha-256
# auth_file = "conf/userlist.txt"
[admin]
admin_users = ["postgres"]
stats_users = []
[databases.app]
host = "{host}"
port = {port}
dbname = "app"
user = "{user}"
# password = "..."  pool_size = 20
"""


def test_serve_minimal_config(pg: Any, tmp_path: Path) -> None:
    listen_port = free_port()
    text = MINIMAL.format(listen_port=listen_port, host=pg.host, port=pg.port, user=pg.user)
    if getattr(pg, "password", None):
        text = text.replace('# password = "..."', f'password = "{pg.password}"')
    cfg = tmp_path / "minimal.toml"
    cfg.write_text(text)
    exe = shutil.which("tvproxy")
    command = [exe] if exe else [sys.executable, "-m", "tvproxy"]
    proc = ProxyProcess({"proxy": {"listen_port": listen_port}}, workdir=tmp_path / "run",
                        command=[*command, "serve", "-c", str(cfg)])
    try:
        proc.start(timeout=15)
        with psycopg.connect(proc.dsn(), autocommit=True) as c:
            assert c.execute("SELECT current_database(), current_user").fetchone() == (
                "app", pg.user)
        cfg_values = show_config(proc)
        assert cfg_values["default_pool_size"] == "20"
        assert cfg_values["max_client_conn"] == "1000"
        assert cfg_values["listen_port"] == str(listen_port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.cleanup()


# --------------------------------------------------------------------------------------------
# SIGHUP


def test_sighup_reload_changes_default_pool_size(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    assert parallel_backends(proxy) == 1
    assert show_config(proxy)["default_pool_size"] == "1"
    config = proxy.config
    config["proxy"]["default_pool_size"] = 3
    proxy.reload(config)
    assert wait_until(lambda: "config reloaded" in proxy.logs(), 5), proxy.logs()
    assert show_config(proxy)["default_pool_size"] == "3"
    assert parallel_backends(proxy) == 3


@pytest.mark.parametrize(
    "broken",
    [
        "[proxy\nlisten_port = ",                      # not TOML
        "[proxy]\ndefault_pool_size = 'lots'\n",        # bad value
        "[proxy]\ndefault_pool_sise = 5\n",             # unknown key
    ],
)
def test_sighup_with_broken_file_keeps_old_config(pg: Any, proxy_factory: Any,
                                                  broken: str) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    good = dict(proxy.config)
    with psycopg.connect(proxy.dsn(), autocommit=True) as held:
        held.execute("SELECT 1")
        proxy.config_path.write_text(broken)
        proxy.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed" in proxy.logs(), 5), proxy.logs()
        assert proxy.running
        assert held.execute("SELECT 2").fetchone() == (2,)
        with psycopg.connect(proxy.dsn(), autocommit=True) as fresh:
            assert fresh.execute("SELECT 3").fetchone() == (3,)
        assert parallel_backends(proxy) == 1
        assert show_config(proxy)["default_pool_size"] == "1"
        # a fixed file is picked up by the next SIGHUP
        good["proxy"] = {**good["proxy"], "default_pool_size": 2}
        proxy.reload(good)
        assert wait_until(lambda: "config reloaded" in proxy.logs(), 5), proxy.logs()
        assert parallel_backends(proxy) == 2


# --------------------------------------------------------------------------------------------
# signals that stop the proxy


def test_sigterm_waits_for_idle_client(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    client = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        client.execute("SELECT 1")
        proxy.send_signal(signal.SIGTERM)
        assert wait_until(lambda: refused(proxy), 3), "no new connections after SIGTERM"
        time.sleep(1.0)
        assert proxy.running, "SIGTERM waits for connected clients"
        # the connected client keeps working, transactions included
        with client.transaction():
            assert client.execute("SELECT 2").fetchone() == (2,)
    finally:
        client.close()
    assert proxy.wait(5) == 0


def test_sigterm_twice_exits_at_once(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    client = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        client.execute("BEGIN")
        client.execute("SELECT 1")
        proxy.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proxy.running
        t0 = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(3) == 0
        assert time.monotonic() - t0 < 2
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 2")
    finally:
        client.close()


def test_sigint_lets_running_transaction_finish_then_exits(pg: Any, proxy_factory: Any) -> None:
    table = f"op_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        d.execute(f"CREATE TABLE {table} (v int)")
    proxy = proxy_factory()
    client = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        client.execute("BEGIN")
        client.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.send_signal(signal.SIGINT)
        assert wait_until(lambda: refused(proxy), 3), "no new connections after SIGINT"
        time.sleep(0.8)
        assert proxy.running, "SIGINT waits for the open transaction"
        client.execute(f"INSERT INTO {table} VALUES (2)")
        client.execute("COMMIT")
        # the transaction is over: the proxy goes, though the client is still connected
        assert wait_until(lambda: not proxy.running, 3), "proxy still running after COMMIT"
        assert proxy.returncode == 0
    finally:
        client.close()
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        assert d.execute(f"SELECT sum(v) FROM {table}").fetchone() == (3,)


def test_sigint_with_only_idle_clients_exits_promptly(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(), autocommit=True) as client:
        client.execute("SELECT 1")
        proxy.send_signal(signal.SIGINT)
        assert wait_until(lambda: not proxy.running, 3)
        assert proxy.returncode == 0


def test_sigint_twice_exits_at_once(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    client = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        client.execute("BEGIN")
        client.execute("SELECT 1")
        proxy.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proxy.running
        proxy.send_signal(signal.SIGINT)
        assert proxy.wait(3) == 0
    finally:
        client.close()


def test_sigquit_exits_at_once(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    client = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        client.execute("BEGIN")
        client.execute("SELECT 1")
        t0 = time.monotonic()
        proxy.send_signal(signal.SIGQUIT)
        assert proxy.wait(3) == 0
        assert time.monotonic() - t0 < 2
    finally:
        client.close()
    # and no transaction is left open on the server
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as m:
        assert wait_until(lambda: m.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'"
            " AND state LIKE 'idle in transaction%'").fetchone() == (0,), 3)


# --------------------------------------------------------------------------------------------
# environment overrides


def test_env_override_default_pool_size(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 4},
                          env={"TVPROXY_PROXY_DEFAULT_POOL_SIZE": "1"})
    assert parallel_backends(proxy) == 1
    assert show_config(proxy)["default_pool_size"] == "1"
    # the environment still wins after a reload of the file
    proxy.reload(proxy.config)
    assert wait_until(lambda: "config reloaded" in proxy.logs(), 5), proxy.logs()
    assert parallel_backends(proxy) == 1
