"""Pooling behaviour through a real tvproxy process against a real PostgreSQL.

Server backends are counted in ``pg_stat_activity`` over a direct connection to the
``postgres`` database, so the monitor never shows up under ``datname = 'app'``.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from harness import wait_until

COUNT_SQL = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = %s AND backend_type = 'client backend'"
    " AND application_name NOT LIKE 'tvproxy-listener %%'"  # the TVIEW catalog listener
)


# --------------------------------------------------------------------------------------------
# helpers


def backend_count(pg: Any, db: str = "app") -> int:
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as c:
        row = c.execute(COUNT_SQL, (db,)).fetchone()
        assert row is not None
        return int(row[0])




@pytest.fixture(autouse=True)
def no_leftover_backends(pg: Any) -> Iterator[None]:
    """Start every test with no backend in app/app2 (earlier proxies have gone away)."""
    ok = wait_until(lambda: backend_count(pg, "app") + backend_count(pg, "app2") == 0, 5)
    if not ok:
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname IN ('app', 'app2') AND backend_type = 'client backend'"
            )
        wait_until(lambda: backend_count(pg, "app") + backend_count(pg, "app2") == 0, 5)
    yield


def direct_settings(pg: Any, names: list[str]) -> dict[str, str]:
    """What a plain client sees on a fresh server (the values a client must not leak into)."""
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        return {n: c.execute(f"SHOW {n}").fetchone()[0] for n in names}  # type: ignore[index]


async def acount(monitor: psycopg.AsyncConnection, db: str = "app") -> int:
    cur = await monitor.execute(COUNT_SQL, (db,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# --------------------------------------------------------------------------------------------
# pool size


async def test_transaction_mode_40_clients_never_exceed_pool_size(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 4, "pool_mode": "transaction"})
    stop = asyncio.Event()
    peak = 0

    async def monitor() -> None:
        nonlocal peak
        async with await psycopg.AsyncConnection.connect(pg.dsn("postgres"), autocommit=True) as m:
            while not stop.is_set():
                peak = max(peak, await acount(m))
                await asyncio.sleep(0.02)

    async def client(i: int) -> tuple[set[int], int]:
        pids: set[int] = set()
        done = 0
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as c:
            for j in range(5):
                async with c.transaction():
                    cur = await c.execute(
                        "SELECT pg_backend_pid(), %s::int * 2, pg_sleep(0.01)", (i * 100 + j,)
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    assert row[1] == (i * 100 + j) * 2
                    pids.add(row[0])
                    cur = await c.execute("SELECT %s::text", (f"c{i}-{j}",))
                    assert (await cur.fetchone()) == (f"c{i}-{j}",)
                done += 1
        return pids, done

    mon = asyncio.create_task(monitor())
    try:
        results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(40))), 60)
    finally:
        stop.set()
        await mon
    all_pids = set().union(*(p for p, _ in results))
    assert sum(d for _, d in results) == 200
    assert 1 <= len(all_pids) <= 4, all_pids
    assert 1 <= peak <= 4, peak


def test_session_mode_keeps_backend_and_set(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"pool_mode": "session", "default_pool_size": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True) as a:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        a.execute("SET statement_timeout = '12s'")
        with psycopg.connect(proxy.dsn(), autocommit=True) as b:
            pid_b = b.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            assert pid_b != pid_a
            for i in range(4):
                with a.transaction():
                    row = a.execute("SELECT pg_backend_pid(), %s::int", (i,)).fetchone()
                    assert row == (pid_a, i)
                b.execute("SELECT 1")
                assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_b  # type: ignore[index]
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "12s"  # type: ignore[index]
            assert b.execute("SHOW statement_timeout").fetchone()[0] == "0"  # type: ignore[index]
    # the next session gets a reset server: nothing of a's SET is left
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SHOW statement_timeout").fetchone()[0] == "0"  # type: ignore[index]


def test_transaction_mode_two_clients_alternating(pg: Any, proxy_factory: Any) -> None:
    table = f"alt_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        d.execute(f"CREATE TABLE {table} (who text, n int)")
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    pids: set[int] = set()
    with psycopg.connect(proxy.dsn(), autocommit=True) as a, psycopg.connect(
        proxy.dsn(), autocommit=True
    ) as b:
        for i in range(5):
            with a.transaction():
                a.execute(f"INSERT INTO {table} VALUES ('a', %s)", (i,))
                pids.add(a.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            with b.transaction():
                b.execute(f"INSERT INTO {table} VALUES ('b', %s)", (i,))
                pids.add(b.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            # a rolled back transaction is not seen by the other client on the same server
            with pytest.raises(psycopg.errors.DivisionByZero), a.transaction():
                a.execute(f"INSERT INTO {table} VALUES ('x', %s)", (i,))
                a.execute("SELECT 1/0")
            assert b.execute(f"SELECT count(*) FROM {table} WHERE who = 'x'").fetchone() == (0,)
        counts = dict(b.execute(f"SELECT who, count(*) FROM {table} GROUP BY who").fetchall())
        assert counts == {"a": 5, "b": 5}
        assert a.execute(f"SELECT sum(n) FROM {table} WHERE who = 'b'").fetchone() == (10,)
    assert len(pids) == 1


# --------------------------------------------------------------------------------------------
# startup parameters


PARAM_NAMES = [
    "application_name", "TimeZone", "DateStyle", "IntervalStyle", "search_path",
    "client_encoding", "extra_float_digits",
]


async def test_startup_parameters_follow_each_client(pg: Any, proxy_factory: Any) -> None:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        for s in ("s_alpha", "s_beta"):
            d.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
            d.execute(f"CREATE SCHEMA {s}")
            d.execute(f"CREATE TABLE {s}.which (v text)")
            d.execute(f"INSERT INTO {s}.which VALUES ('{s}')")
    defaults = direct_settings(pg, PARAM_NAMES)
    proxy = proxy_factory(proxy={"default_pool_size": 1})

    alpha = {
        "application_name": "alpha", "TimeZone": "Asia/Tokyo", "DateStyle": "SQL, DMY",
        "IntervalStyle": "iso_8601", "search_path": "s_alpha, public", "client_encoding": "LATIN1",
        "extra_float_digits": "3",
    }
    beta = {
        "application_name": "beta", "TimeZone": "America/New_York", "DateStyle": "German, DMY",
        "IntervalStyle": "sql_standard", "search_path": "s_beta, public", "client_encoding": "UTF8",
        "extra_float_digits": "0",
    }
    gamma = {
        "application_name": "gamma", "TimeZone": "Europe/Paris", "DateStyle": "ISO, YMD",
        "IntervalStyle": "postgres_verbose", "search_path": "s_beta", "client_encoding": "UTF8",
        "extra_float_digits": "2",
    }

    def options(p: dict[str, str]) -> str:
        return " ".join(
            f"-c {k}={v.replace(' ', '')}"
            for k, v in p.items()
            if k in ("TimeZone", "DateStyle", "IntervalStyle", "search_path", "extra_float_digits")
        )

    # alpha and beta: psycopg, settings in libpq `options` (-c key=value) and conninfo keys
    def conninfo(p: dict[str, str]) -> dict[str, str]:
        return {"application_name": p["application_name"], "options": options(p),
                "client_encoding": p["client_encoding"]}

    gamma_settings = {k: v for k, v in gamma.items() if k != "client_encoding"}
    # what PostgreSQL itself shows a client connecting with these settings is the oracle
    want: dict[str, dict[str, str]] = {}
    for name, p in (("alpha", alpha), ("beta", beta)):
        dsn = pg.dsn("app") + "".join(f" {k}='{v}'" for k, v in conninfo(p).items())
        with psycopg.connect(dsn, autocommit=True) as direct:
            want[name] = {n: direct.execute(f"SHOW {n}").fetchone()[0] for n in PARAM_NAMES}  # type: ignore[index]
    direct_g = await asyncpg.connect(pg.url("app"), server_settings=gamma_settings)
    want["gamma"] = {n: await direct_g.fetchval(f"SHOW {n}") for n in PARAM_NAMES}
    await direct_g.close()
    assert want["alpha"]["TimeZone"] == "Asia/Tokyo" and want["beta"]["DateStyle"] == "German, DMY"

    a = await psycopg.AsyncConnection.connect(proxy.dsn(**conninfo(alpha)), autocommit=True)
    b = await psycopg.AsyncConnection.connect(proxy.dsn(**conninfo(beta)), autocommit=True)
    # gamma: asyncpg, settings as plain StartupMessage parameters
    g = await asyncpg.connect(proxy.url(), server_settings=gamma_settings)
    # delta: psycopg with nothing set: must see the server's defaults, whoever ran before it
    d = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    try:
        pids: set[int] = set()

        async def check_psycopg(conn: psycopg.AsyncConnection, want: dict[str, str]) -> None:
            got = {}
            for n in PARAM_NAMES:
                cur = await conn.execute(f"SHOW {n}")
                got[n] = (await cur.fetchone())[0]  # type: ignore[index]
            assert got == want
            cur = await conn.execute("SELECT pg_backend_pid()")
            pids.add((await cur.fetchone())[0])  # type: ignore[index]

        for _ in range(3):
            await check_psycopg(a, want["alpha"])
            await check_psycopg(b, want["beta"])
            got = {n: await g.fetchval(f"SHOW {n}") for n in PARAM_NAMES}
            assert got == want["gamma"]
            pids.add(await g.fetchval("SELECT pg_backend_pid()"))
            assert await g.fetchval("SELECT v FROM which") == "s_beta"
            await check_psycopg(d, defaults)
            cur = await a.execute("SELECT v FROM which")
            assert await cur.fetchone() == ("s_alpha",)
            cur = await b.execute("SELECT now()::date::text ~ '^[0-9]{2}\\.[0-9]{2}\\.'")
            assert await cur.fetchone() == (True,)  # German DateStyle is in force for beta
        assert len(pids) == 1, "pool_size 1: all four clients shared one backend"
    finally:
        await a.close()
        await b.close()
        await g.close()
        await d.close()


def test_set_application_name_in_transaction_is_kept(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    default_tz = direct_settings(pg, ["TimeZone"])["TimeZone"]
    with psycopg.connect(proxy.dsn(application_name="alpha"), autocommit=True) as a, \
            psycopg.connect(proxy.dsn(application_name="beta"), autocommit=True) as b:
        with a.transaction():
            a.execute("SET application_name = 'alpha2'")
        assert b.execute("SHOW application_name").fetchone() == ("beta",)
        assert a.execute("SHOW application_name").fetchone() == ("alpha2",)
        assert a.info.parameter_status("application_name") in ("alpha2", b"alpha2")
        # a SET rolled back with its transaction is forgotten again
        with pytest.raises(psycopg.errors.DivisionByZero), a.transaction():
            a.execute("SET application_name = 'rolled_back'")
            a.execute("SELECT 1/0")
        assert b.execute("SHOW application_name").fetchone() == ("beta",)
        assert a.execute("SHOW application_name").fetchone() == ("alpha2",)
        # a tracked setting changed with a plain SET follows the client, and does not leak
        a.execute("SET TimeZone = 'Pacific/Auckland'")
        assert b.execute("SHOW TimeZone").fetchone() == (default_tz,)
        assert a.execute("SHOW TimeZone").fetchone() == ("Pacific/Auckland",)
        assert b.execute("SHOW TimeZone").fetchone() == (default_tz,)
        assert b.execute("SHOW application_name").fetchone() == ("beta",)
    # and a new client after both of them gets the server's defaults
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SHOW application_name").fetchone() == ("",)
        assert c.execute("SHOW TimeZone").fetchone() == (default_tz,)


def test_lowercase_option_then_set_does_not_resurrect_old_value(pg: Any, proxy_factory: Any) -> None:
    """``-c timezone=...`` (lowercase, as people write it) then ``SET TimeZone``: the SET wins."""
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    with psycopg.connect(proxy.dsn(options="-c timezone=Asia/Tokyo"), autocommit=True) as a, \
            psycopg.connect(proxy.dsn(), autocommit=True) as b:
        assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        a.execute("SET TimeZone = 'Europe/Berlin'")
        b.execute("SELECT 1")  # b takes the server and resets it
        assert a.execute("SHOW TimeZone").fetchone() == ("Europe/Berlin",)


# --------------------------------------------------------------------------------------------
# min_pool_size, reserve pool


def test_min_pool_size_refills_after_use(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"min_pool_size": 2, "default_pool_size": 4,
                                 "server_idle_timeout": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        c.execute("SELECT 1")
    assert wait_until(lambda: backend_count(pg) == 2, 4), backend_count(pg)
    time.sleep(2.0)  # past server_idle_timeout: the pool keeps min_pool_size
    assert backend_count(pg) == 2


def test_min_pool_size_opens_backends_without_any_client(pg: Any, proxy_factory: Any) -> None:
    """As PgBouncer: a database with a forced user has a pool from the start."""
    proxy_factory(proxy={"min_pool_size": 2, "default_pool_size": 4})
    assert wait_until(lambda: backend_count(pg) == 2, 4), backend_count(pg)


async def test_reserve_pool_after_timeout(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 2, "reserve_pool_size": 2,
                                 "reserve_pool_timeout": 1})
    conns = [await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) for _ in range(5)]
    monitor = await psycopg.AsyncConnection.connect(pg.dsn("postgres"), autocommit=True)
    try:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(c.execute("SELECT pg_sleep(2.4)")) for c in conns]
        await asyncio.sleep(0.6)
        early = await acount(monitor)
        peak = early
        while time.monotonic() - t0 < 2.1:
            peak = max(peak, await acount(monitor))
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert early == 2, "only pool_size backends before reserve_pool_timeout"
        assert peak == 4, "reserve_pool_size more after reserve_pool_timeout, never more"
    finally:
        for c in conns:
            await c.close()
        await monitor.close()
    assert "reserve" in proxy.logs()


# --------------------------------------------------------------------------------------------
# limits and timeouts


async def test_query_wait_timeout(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1, "query_wait_timeout": 1})
    holder = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    waiter = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1")
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as ei:
            await asyncio.wait_for(waiter.execute("SELECT 1"), 10)
        elapsed = time.monotonic() - t0
        assert "query_wait_timeout" in str(ei.value)
        assert 0.8 <= elapsed < 4, elapsed
        # the holder was not affected
        cur = await holder.execute("SELECT 42")
        assert await cur.fetchone() == (42,)
        await holder.execute("COMMIT")
    finally:
        await holder.close()
        await waiter.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 7").fetchone() == (7,)


async def test_query_wait_is_fine_when_shorter_than_timeout(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1, "query_wait_timeout": 2})
    holder = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    waiter = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
    try:
        await holder.execute("BEGIN")
        task = asyncio.create_task(waiter.execute("SELECT 5"))
        await asyncio.sleep(0.7)
        assert not task.done()
        await holder.execute("COMMIT")
        cur = await asyncio.wait_for(task, 5)
        assert await cur.fetchone() == (5,)
    finally:
        await holder.close()
        await waiter.close()


async def test_queued_client_that_leaves_does_not_take_a_server(pg: Any,
                                                                 proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    holder = await asyncpg.connect(proxy.url())
    quitter = await asyncpg.connect(proxy.url())
    try:
        tr = holder.transaction()
        await tr.start()
        await holder.fetchval("SELECT 1")
        queued = asyncio.create_task(quitter.fetchval("SELECT 1"))
        await asyncio.sleep(0.3)
        assert not queued.done()
        quitter.terminate()  # gone while waiting for a server
        await tr.commit()
        # (the proxy may close the server the dead waiter was handed: its request was in flight)
        after = await asyncpg.connect(proxy.url())
        try:
            assert await asyncio.wait_for(after.fetchval("SELECT 9"), 5) == 9
        finally:
            await after.close()
        assert await holder.fetchval("SELECT 8") == 8
        assert backend_count(pg) == 1
    finally:
        await holder.close()
        quitter.terminate()


async def test_max_client_conn_rejects_with_53300(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"max_client_conn": 3})
    conns = [await asyncpg.connect(proxy.url()) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.PostgresError) as ei:
            await asyncio.wait_for(asyncpg.connect(proxy.url()), 10)
        assert ei.value.sqlstate == "53300"
        assert "max_client_conn" in str(ei.value)
        for c in conns:
            assert await c.fetchval("SELECT 1") == 1
        await conns.pop().close()
        await asyncio.sleep(0.2)
        conns.append(await asyncpg.connect(proxy.url()))
        assert await conns[-1].fetchval("SELECT 2") == 2
    finally:
        for c in conns:
            await c.close()


def test_server_idle_timeout_closes_idle_backends(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"server_idle_timeout": 1, "default_pool_size": 4})
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        pid1 = c.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert backend_count(pg) == 1
        assert wait_until(lambda: backend_count(pg) == 0, 4)
        # the client (still connected) gets a fresh backend
        pid2 = c.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert pid2 != pid1
        assert backend_count(pg) == 1


def test_server_lifetime_closes_old_backends(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"server_lifetime": 1, "server_idle_timeout": 600,
                                 "default_pool_size": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        pids = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            pids.append(c.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            time.sleep(0.1)
        assert len(set(pids)) >= 2, "a busy server is replaced once older than server_lifetime"
        assert wait_until(lambda: backend_count(pg) == 0, 4)
        assert c.execute("SELECT 3").fetchone() == (3,)


def test_idle_transaction_timeout(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"idle_transaction_timeout": 1})
    with psycopg.connect(proxy.dsn()) as idle:
        idle.execute("SELECT 1")  # psycopg opens a transaction (autocommit off)
        time.sleep(2.3)
        with pytest.raises(psycopg.Error) as ei:
            idle.execute("SELECT 2")
        assert ei.value.sqlstate in (None, "08P01", "25P03"), ei.value.sqlstate
        assert idle.closed or idle.broken

    def idle_in_tx() -> int:
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as m:
            return m.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'"
                " AND state LIKE 'idle in transaction%'"
            ).fetchone()[0]  # type: ignore[index]

    assert wait_until(lambda: idle_in_tx() == 0, 3)
    # a transaction that is busy, not idle, is not killed
    with psycopg.connect(proxy.dsn()) as busy:
        busy.execute("SELECT pg_sleep(1.6)")
        busy.execute("SELECT pg_sleep(0.2)")
        assert busy.execute("SELECT 4").fetchone() == (4,)
        busy.commit()


def test_client_login_timeout(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"client_login_timeout": 1})
    silent = socket.create_connection((proxy.host, proxy.port), timeout=6)
    partial = socket.create_connection((proxy.host, proxy.port), timeout=6)
    partial.sendall(b"\x00\x00\x00\x28\x00\x03")  # half a startup packet, then nothing
    try:
        t0 = time.monotonic()
        for s in (silent, partial):
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data == b"" or data[:1] == b"E"
        elapsed = time.monotonic() - t0
        assert 0.8 <= elapsed < 4, elapsed
    finally:
        silent.close()
        partial.close()
    # a proper client still gets in
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
