"""pgbench through tvproxy in transaction mode: 32 clients on 4 server connections.

A shortened version of the acceptance run (``pgbench -c 32 -j 2 -T 10``): ``-T 3`` per mode.
Besides pgbench's own verdict (exit code, zero failed transactions) the TPC-B-like runs are
checked for atomicity: every committed transaction adds one history row and the balances of
accounts, tellers, branches and history stay equal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import default_proxy_config
from harness import ProxyProcess, deep_merge, wait_until

DB = "app2"
DURATION = 3


def pgbench_path(pg: Any) -> str:
    getter = getattr(pg, "bin", None)
    if getter is not None:
        try:
            path = getter("pgbench")
        except Exception:
            path = None
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("pgbench")
    if not found:
        pytest.fail("pgbench not found (neither the test server's bindir nor PATH)")
    return found


def run_pgbench(pg: Any, proxy: ProxyProcess, *args: str, timeout: float = 60) -> str:
    cmd = [
        pgbench_path(pg),
        "-h", proxy.host,
        "-p", str(proxy.port),
        "-U", "postgres",
        *args,
        DB,
    ]  # fmt: skip
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"}
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, (
        f"{' '.join(cmd)} exited {r.returncode}\n{out}\n{proxy.logs()[-3000:]}"
    )
    return out


@pytest.fixture(scope="module")
def bench_proxy(pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy (pool size 4) for the module, with pgbench's tables made through it."""
    config = deep_merge(default_proxy_config(pg), {"proxy": {"default_pool_size": 4}})
    proxy = ProxyProcess(config, workdir=tmp_path_factory.mktemp("tvproxy-pgbench"))
    proxy.start()
    try:
        out = run_pgbench(pg, proxy, "-i", "-s", "1", "-q")
        assert "done" in out, out
        yield proxy
    finally:
        proxy.stop()


def direct(pg: Any) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(DB), autocommit=True)


def balances(pg: Any) -> tuple[int, int, int, int, int]:
    with direct(pg) as c:
        return c.execute(
            "SELECT (SELECT count(*) FROM pgbench_history),"
            " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
            " (SELECT sum(abalance) FROM pgbench_accounts),"
            " (SELECT sum(tbalance) FROM pgbench_tellers),"
            " (SELECT sum(bbalance) FROM pgbench_branches)"
        ).fetchone()  # type: ignore[return-value]


def figure(out: str, pattern: str) -> int:
    m = re.search(pattern, out)
    assert m, f"no match for {pattern!r} in pgbench output:\n{out}"
    return int(m.group(1))


def test_pgbench_init_through_proxy(bench_proxy: ProxyProcess, pg: Any) -> None:
    with direct(pg) as c:
        assert c.execute(
            "SELECT (SELECT count(*) FROM pgbench_accounts),"
            " (SELECT count(*) FROM pgbench_tellers),"
            " (SELECT count(*) FROM pgbench_branches),"
            " (SELECT count(*) FROM pgbench_history)"
        ).fetchone() == (100_000, 10, 1, 0)
        # the primary keys were made too (last init step)
        assert c.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'pgbench_%_pkey'"
        ).fetchone() == (3,)


@pytest.mark.parametrize("select_only", [False, True], ids=["tpcb", "select-only"])
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_32_clients_4_servers(
    bench_proxy: ProxyProcess, pg: Any, mode: str, select_only: bool
) -> None:
    before = balances(pg)
    args = ["-c", "32", "-j", "2", "-T", str(DURATION), "-M", mode, "-n"]
    if select_only:
        args.append("-S")
    out = run_pgbench(pg, bench_proxy, *args)
    processed = figure(out, r"number of transactions actually processed: (\d+)")
    failed = figure(out, r"number of failed transactions: (\d+)")
    assert failed == 0, out
    assert processed > 0, out
    assert f"query mode: {mode}" in out
    assert "number of clients: 32" in out

    after = balances(pg)
    count, delta, abal, tbal, bbal = after
    assert delta == abal == tbal == bbal, after  # every transaction applied whole
    if select_only:
        assert after == before
    else:
        assert count - before[0] == processed, (before, after, out)

    with direct(pg) as c:
        # nothing left behind on the servers
        assert c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND state LIKE 'idle in transaction%%'",
            (DB,),
        ).fetchone() == (0,)
        def servers() -> list[tuple[Any, ...]]:
            return c.execute(
                "SELECT pid, application_name, backend_start FROM pg_stat_activity WHERE "
                "datname = %s AND pid <> pg_backend_pid() AND application_name NOT LIKE "
                "'tvproxy-listener %%'",  # TVIEW catalog listener
                (DB,),
            ).fetchall()

        # a backend pgbench itself used (its setup connection) may take a moment to leave
        wait_until(lambda: len(servers()) <= 4, 10)
        seen = servers()
        assert 1 <= len(seen) <= 4, seen  # 32 clients went through at most 4 connections
