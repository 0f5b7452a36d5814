"""Real drivers through tvproxy in transaction mode: asyncpg, psycopg 3 (sync, async, libpq
pipeline), psql.  More clients than server connections, results checked exactly against what
the tests wrote, verified where it matters through a direct connection to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
import os
import select
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as E
from psycopg import pq

POOL4 = {"default_pool_size": 4}
N_CLIENTS = 40
TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# helpers


def direct(pg: Any, dbname: str = "app") -> psycopg.Connection:
    """A connection straight to PostgreSQL (setup and verification, not through the proxy)."""
    return psycopg.connect(pg.dsn(dbname), autocommit=True)


def fresh_table(pg: Any, name: str, columns: str) -> None:
    with direct(pg) as c:
        c.execute(f"DROP TABLE IF EXISTS {name}")
        c.execute(f"CREATE TABLE {name} ({columns})")


def run_threads(n: int, fn: Callable[[int], Any], timeout: float = TIMEOUT) -> list[Any]:
    """Run fn(0..n-1) in n threads at once; re-raise the first failure.

    A client stuck on a reply that never comes fails the test after ``timeout`` instead of
    hanging it (its thread ends when the proxy is stopped at teardown).
    """
    ex = ThreadPoolExecutor(max_workers=n)
    try:
        futures = [ex.submit(fn, k) for k in range(n)]
        deadline = time.monotonic() + timeout
        return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


async def gather(*aws: Any, timeout: float = TIMEOUT) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*aws), timeout)


async def aclose(conn: asyncpg.Connection) -> None:
    """Close an asyncpg connection; if the proxy does not answer, drop it."""
    try:
        await asyncio.wait_for(conn.close(), 5)
    except (TimeoutError, asyncio.CancelledError, OSError):
        conn.terminate()


def pg_program(pg: Any, name: str) -> str:
    """Path of a PostgreSQL client program (psql, pgbench): the server's own, else PATH."""
    getter = getattr(pg, "bin", None)
    if getter is not None:
        try:
            path = getter(name)
        except Exception:
            path = None
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found (neither the test server's bindir nor PATH)")
    return found


def tag() -> str:
    return uuid.uuid4().hex[:10]


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def backend_pid_holding(proxy: Any) -> tuple[psycopg.Connection, int]:
    """A client that opens a transaction through the proxy (so keeps its server) and its pid."""
    conn = psycopg.connect(proxy.dsn(), connect_timeout=10)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
    return conn, pid


# --------------------------------------------------------------------------------------------
# asyncpg


async def test_asyncpg_many_clients_mixed_workload(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "apg_mix", "client int, n int, v int")
    per_client = sum(range(50)) + 1000

    async def client(k: int) -> set[int]:
        conn = await asyncpg.connect(proxy.url(), timeout=30)
        pids = set()
        try:
            for i in range(5):
                assert await conn.fetchval("SELECT $1::int * $2::int + 1", k, i) == k * i + 1
                assert await conn.fetchval("SELECT $1::text || '-' || $2::int", f"c{k}", i) == (
                    f"c{k}-{i}"
                )
            stats = await conn.prepare(
                "SELECT count(*), coalesce(sum(v), 0)::int, pg_backend_pid() "
                "FROM apg_mix WHERE client = $1"
            )
            row = await stats.fetchrow(k)
            assert (row[0], row[1]) == (0, 0)
            await conn.executemany(
                "INSERT INTO apg_mix (client, n, v) VALUES ($1, $2, $3)",
                [(k, i, i) for i in range(50)],
            )
            row = await stats.fetchrow(k)
            assert (row[0], row[1]) == (50, sum(range(50)))

            async with conn.transaction():
                await conn.execute("INSERT INTO apg_mix VALUES ($1, 1000, 1000)", k)
                row = await stats.fetchrow(k)
                assert (row[0], row[1]) == (51, per_client)
                # the same server for the whole transaction
                assert await conn.fetchval("SELECT pg_backend_pid()") == row[2]

            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO apg_mix VALUES ($1, 2000, 2000)", k)
                    await conn.fetchval("SELECT 1 / ($1::int - $1::int)", k)

            tr = conn.transaction()
            await tr.start()
            await conn.execute("INSERT INTO apg_mix VALUES ($1, 3000, 3000)", k)
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.execute("SELECT * FROM apg_no_such_table")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tr.rollback()

            for _ in range(10):
                row = await stats.fetchrow(k)
                assert (row[0], row[1]) == (51, per_client)
                pids.add(row[2])
                await asyncio.sleep(0)
            assert await conn.fetchval("SELECT 42") == 42
        finally:
            await aclose(conn)
        return pids

    results = await gather(*(client(k) for k in range(N_CLIENTS)))
    all_pids = set().union(*results)
    assert 1 <= len(all_pids) <= 4, all_pids  # 40 clients shared at most 4 servers
    with direct(pg) as c:
        assert c.execute("SELECT count(*), sum(v) FROM apg_mix").fetchone() == (
            N_CLIENTS * 51,
            N_CLIENTS * per_client,
        )
        assert c.execute("SELECT count(*) FROM apg_mix WHERE n >= 2000").fetchone() == (0,)
        # nothing left open on the server
        assert c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' "
            "AND state LIKE 'idle in transaction%'"
        ).fetchone() == (0,)


async def test_asyncpg_executemany_many_rows(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "apg_many", "client int NOT NULL, i int, s text")
    rows_per_client = 5000
    clients = 8

    async def client(k: int) -> None:
        conn = await asyncpg.connect(proxy.url(), timeout=30)
        try:
            await conn.executemany(
                "INSERT INTO apg_many VALUES ($1, $2, $3)",
                [(k, i, f"r{k}.{i}") for i in range(rows_per_client)],
            )
            row = await conn.fetchrow(
                "SELECT count(*), sum(i), count(DISTINCT s) FROM apg_many WHERE client = $1", k
            )
            assert tuple(row) == (rows_per_client, sum(range(rows_per_client)), rows_per_client)
            # executemany inside a transaction that fails on its last row: all or nothing
            with pytest.raises(asyncpg.NotNullViolationError):
                async with conn.transaction():
                    await conn.executemany(
                        "INSERT INTO apg_many VALUES ($1, $2, $3)",
                        [(k, -1, "x")] * 100 + [(None, -1, "x")],
                    )
            assert (
                await conn.fetchval("SELECT count(*) FROM apg_many WHERE client = $1", k)
                == rows_per_client
            )
        finally:
            await aclose(conn)

    await gather(*(client(k) for k in range(clients)))
    with direct(pg) as c:
        assert c.execute("SELECT count(*), count(DISTINCT client) FROM apg_many").fetchone() == (
            clients * rows_per_client,
            clients,
        )


# --------------------------------------------------------------------------------------------
# psycopg 3: prepared statements with many clients


def test_psycopg_sync_prepare_many_clients(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "pg3_sync", "client int, i int")

    def client(k: int) -> set[int]:
        pids = set()
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
            for i in range(15):
                row = conn.execute(
                    "SELECT %s::int + %s::int, %s::text, pg_backend_pid()",
                    (k, i, f"c{k}"),
                    prepare=True,
                ).fetchone()
                assert row[:2] == (k + i, f"c{k}")
                pids.add(row[2])
            with conn.transaction():
                for i in range(10):
                    conn.execute("INSERT INTO pg3_sync VALUES (%s, %s)", (k, i), prepare=True)
            # a failing transaction block: after its ROLLBACK psycopg sends DEALLOCATE ALL
            with pytest.raises(E.DivisionByZero), conn.transaction():
                conn.execute("INSERT INTO pg3_sync VALUES (%s, %s)", (k, 99), prepare=True)
                conn.execute("SELECT 1 / (%s - %s)", (k, k), prepare=True)
            for _ in range(5):
                assert conn.execute(
                    "SELECT count(*), sum(i) FROM pg3_sync WHERE client = %s", (k,), prepare=True
                ).fetchone() == (10, 45)
        return pids

    pids = set().union(*run_threads(N_CLIENTS, client))
    assert 1 <= len(pids) <= 4
    with direct(pg) as c:
        assert c.execute("SELECT count(*), sum(i) FROM pg3_sync").fetchone() == (
            N_CLIENTS * 10,
            N_CLIENTS * 45,
        )


async def test_psycopg_async_prepare_many_clients(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "pg3_async", "client int, i int, s text")

    async def client(k: int) -> None:
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, connect_timeout=10
        ) as conn:
            for i in range(15):
                cur = await conn.execute(
                    "SELECT %s::int * 3, %s::text", (k + i, f"a{k}.{i}"), prepare=True
                )
                assert await cur.fetchone() == ((k + i) * 3, f"a{k}.{i}")
            async with conn.transaction():
                cur = conn.cursor()
                await cur.executemany(
                    "INSERT INTO pg3_async VALUES (%s, %s, %s)",
                    [(k, i, f"s{i}") for i in range(20)],
                )
            with pytest.raises(E.DivisionByZero):
                async with conn.transaction():
                    await conn.execute("INSERT INTO pg3_async VALUES (%s, -1, 'x')", (k,))
                    await conn.execute("SELECT 1 / 0")
            for _ in range(6):
                cur = await conn.execute(
                    "SELECT count(*), sum(i) FROM pg3_async WHERE client = %s", (k,), prepare=True
                )
                assert await cur.fetchone() == (20, sum(range(20)))

    await gather(*(client(k) for k in range(N_CLIENTS)))
    with direct(pg) as c:
        assert c.execute("SELECT count(*), min(i) FROM pg3_async").fetchone() == (
            N_CLIENTS * 20,
            0,
        )


# --------------------------------------------------------------------------------------------
# pipelining


def _pipeline_scenario(dsn: str, k: int) -> list[Any]:
    """A psycopg pipeline with a failing statement in the middle; returns what happened."""
    base = k * 100
    events: list[Any] = []

    def outcome(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except psycopg.Error as exc:
            return type(exc).__name__

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        with conn.pipeline() as p:
            c1 = conn.execute("INSERT INTO pl_t VALUES (%s) RETURNING x", (base + 1,))
            # fails 0.2 s into its execution (pg_sleep is volatile: nothing is folded at plan
            # time), so that psycopg reads the error at the fetch below, not at an execute
            conn.execute("SELECT 1 / length(pg_sleep(0.2)::text), %s::int", (k,))
            c3 = conn.execute("INSERT INTO pl_t VALUES (%s)", (base + 3,))
            c4 = conn.execute("SELECT 5")
            events.append(outcome(c4.fetchone))  # reads everything up to c4: the error first
            c6 = conn.cursor()
            events.append(outcome(lambda: c6.execute("SELECT 6") and "queued"))
            events.append(outcome(p.sync))  # the Sync reports the aborted statements
            events.append(outcome(c1.fetchone))  # ran, then rolled back with its batch
            events.append((c3.pgresult, c4.pgresult, c6.pgresult))
            c4 = conn.execute("INSERT INTO pl_t VALUES (%s) RETURNING x", (base + 4,))
            c5 = conn.execute("SELECT %s::text, %s::int", (f"k{k}", k))
            c6 = conn.execute("INSERT INTO pl_t VALUES (%s)", (base + 6,))
            p.sync()
            c7 = conn.execute("SELECT %s::int * 2", (k,), prepare=True)
        events += [c4.fetchone(), c5.fetchone(), c6.statusmessage, c7.fetchone()]
        # and after the pipeline, plain queries on the same connection
        events.append(
            conn.execute(
                "SELECT array_agg(x ORDER BY x) FROM pl_t WHERE x / 100 = %s", (k,)
            ).fetchone()
        )
        events.append(conn.info.transaction_status)
    return events


def test_psycopg_pipeline_error_in_the_middle(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "pl_t", "x int")

    def expected(k: int) -> list[Any]:
        base = k * 100
        return [
            "DivisionByZero",
            "queued",
            "PipelineAborted",
            (base + 1,),
            (None, None, None),
            (base + 4,),
            (f"k{k}", k),
            "INSERT 0 1",
            (k * 2,),
            ([base + 4, base + 6],),
            pq.TransactionStatus.IDLE,
        ]

    # what PostgreSQL itself does, without the proxy (client 1000 of the same table)
    assert _pipeline_scenario(pg.dsn("app"), 1000) == expected(1000)
    run_threads(N_CLIENTS, lambda k: _check(_pipeline_scenario(proxy.dsn(), k), expected(k)))


def _check(got: Any, want: Any) -> None:
    assert got == want


def _libpq_pipeline(dsn: str, batches: list[list[tuple[bytes, list[bytes]]]]) -> list[Any]:
    """Send every batch (queries then Sync) before reading anything, with libpq's pipeline.

    Returns per batch the list of per-query outcomes: rows (list of tuples of str), or the
    SQLSTATE string of an error, or "aborted".
    """
    conn = pq.PGconn.connect(dsn.encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message

    def next_result() -> pq.abc.PGresult | None:
        # never block inside libpq: a blocking PQgetResult keeps the GIL from the other clients
        while conn.is_busy():
            ready, _, _ = select.select([conn.socket], [], [], 20)
            assert ready, "no reply within 20 s"
            conn.consume_input()
        return conn.get_result()

    try:
        conn.enter_pipeline_mode()
        for batch in batches:
            for sql, params in batch:
                conn.send_query_params(sql, params)
            conn.pipeline_sync()
        conn.flush()
        out: list[Any] = []
        for batch in batches:
            got: list[Any] = []
            for _ in batch:
                res = next_result()
                assert res is not None
                if res.status == pq.ExecStatus.TUPLES_OK:
                    got.append(
                        [
                            tuple(res.get_value(r, c).decode() for c in range(res.nfields))
                            for r in range(res.ntuples)
                        ]
                    )
                elif res.status == pq.ExecStatus.COMMAND_OK:
                    got.append(res.command_status.decode())
                elif res.status == pq.ExecStatus.FATAL_ERROR:
                    got.append(res.error_field(pq.DiagnosticField.SQLSTATE).decode())
                elif res.status == pq.ExecStatus.PIPELINE_ABORTED:
                    got.append("aborted")
                else:
                    raise AssertionError(f"unexpected result status {res.status}")
                assert next_result() is None
            res = next_result()
            assert res is not None and res.status == pq.ExecStatus.PIPELINE_SYNC
            out.append(got)
        conn.exit_pipeline_mode()
        conn.send_query(b"SELECT 'after'")
        res = next_result()
        assert res is not None and res.get_value(0, 0) == b"after"
        assert next_result() is None
        return out
    finally:
        conn.finish()


def test_libpq_pipeline_sync_separated_batches_keep_their_server(
    proxy_factory: Any, pg: Any
) -> None:
    """Batches separated by Sync go out in one burst; ReadyForQuery 'I' after the first batch
    must not release the server while the later batches are in flight (their results would go
    to another client).  20 clients on 2 servers."""
    proxy = proxy_factory(proxy={"default_pool_size": 2})
    fresh_table(pg, "plb_t", "client int, i int")

    def client(k: int) -> None:
        ks = str(k).encode()
        for rnd in range(5):
            rs = str(rnd).encode()
            batches = [
                [(b"SELECT $1::int, $2::int", [ks, rs]), (b"SELECT $1::text || 'x'", [ks])],
                [(b"SELECT pg_sleep(0.002), $1::int * 2", [ks])],
                [
                    (b"INSERT INTO plb_t VALUES ($1, $2)", [ks, rs]),
                    (b"SELECT 1 / ($1::int - $1::int)", [ks]),
                    (b"SELECT $1::int", [ks]),
                ],
                [(b"SELECT count(*) FROM plb_t WHERE client = $1", [ks])],
                [
                    (b"BEGIN", []),
                    (b"INSERT INTO plb_t VALUES ($1, $2)", [ks, rs]),
                    (b"SELECT $1::int + 1000", [ks]),
                ],
                [(b"COMMIT", []), (b"SELECT $1::text", [b"done%d" % k])],
            ]
            got = _libpq_pipeline(proxy.dsn(), batches)
            assert got == [
                [[(str(k), str(rnd))], [(f"{k}x",)]],
                [[("", str(k * 2))]],
                ["INSERT 0 1", "22012", "aborted"],
                [[(str(rnd),)]],
                ["BEGIN", "INSERT 0 1", [(str(k + 1000),)]],
                ["COMMIT", [(f"done{k}",)]],
            ], (k, rnd)

    run_threads(20, client)
    with direct(pg) as c:
        assert c.execute("SELECT count(*), count(DISTINCT client) FROM plb_t").fetchone() == (
            100,
            20,
        )


def test_libpq_pipeline_statements_after_error_before_sync(proxy_factory: Any) -> None:
    """A pipelining client reads an error (after a Flush), then sends more statements and the
    Sync.  PostgreSQL skips those statements without a reply and answers the Sync with
    ReadyForQuery 'I': the server must go back to the pool (one server, a second client)."""
    proxy = proxy_factory(proxy={"default_pool_size": 1, "query_wait_timeout": 3})
    conn = pq.PGconn.connect(proxy.dsn().encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message

    def next_result() -> Any:
        while conn.is_busy():
            ready, _, _ = select.select([conn.socket], [], [], 10)
            assert ready, "no reply within 10 s"
            conn.consume_input()
        res = conn.get_result()
        return None if res is None else pq.ExecStatus(res.status).name

    try:
        conn.enter_pipeline_mode()
        conn.send_query_params(b"SELECT 1 / 0", [])
        conn.send_flush_request()
        conn.flush()
        assert (next_result(), next_result()) == ("FATAL_ERROR", None)
        conn.send_query_params(b"SELECT 2", [])  # after the error, before the Sync
        conn.send_query_params(b"SELECT 3", [])
        conn.pipeline_sync()
        conn.flush()
        assert [next_result() for _ in range(5)] == [
            "PIPELINE_ABORTED",
            None,
            "PIPELINE_ABORTED",
            None,
            "PIPELINE_SYNC",
        ]
        conn.exit_pipeline_mode()

        # the first client is idle: another one gets the only server
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as other:
            assert other.execute("SELECT 'other'").fetchone() == ("other",)

        conn.send_prepare(b"after_error", b"SELECT $1::int + 1")
        assert next_result() == "COMMAND_OK" and next_result() is None
        conn.send_query_prepared(b"after_error", [b"41"])
        while conn.is_busy():
            select.select([conn.socket], [], [], 10)
            conn.consume_input()
        res = conn.get_result()
        assert res is not None and res.get_value(0, 0) == b"42"
        assert conn.get_result() is None
    finally:
        conn.finish()


# --------------------------------------------------------------------------------------------
# COPY


SPECIAL = "tab\there, newline\nhere, backslash \\ and ünïcødé ✓"


def test_psycopg_copy_in_and_out(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "copy_t", "client int, id int, s text")
    big = ("0123456789abcdef" * 65536)[:1_048_576]  # ~1 MB in one row
    nrows = 10_000

    def expected(k: int) -> list[tuple[int, int, str]]:
        rows = [(k, i, f"row {i} of {k}" if i % 1000 else SPECIAL) for i in range(nrows)]
        return rows + [(k, nrows, big + str(k))]

    def client(k: int) -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
            cur = conn.cursor()
            with cur.copy("COPY copy_t (client, id, s) FROM STDIN") as cp:
                for row in expected(k):
                    cp.write_row(row)
            assert cur.rowcount == nrows + 1
            rows = []
            with cur.copy(
                "COPY (SELECT client, id, s FROM copy_t WHERE client = %s ORDER BY id) TO STDOUT",
                (k,),
            ) as cp:
                cp.set_types(["int4", "int4", "text"])
                rows.extend(cp.rows())
            assert rows == expected(k)
            # raw text format, byte for byte, for a slice
            raw = bytearray()
            with cur.copy(
                "COPY (SELECT id, s FROM copy_t WHERE client = %s AND id < 3 ORDER BY id) "
                "TO STDOUT",
                (k,),
            ) as cp:
                for chunk in cp:
                    raw += chunk
            assert bytes(raw) == (
                b"0\ttab\\there, newline\\nhere, backslash \\\\ and "
                + "ünïcødé ✓".encode()
                + b"\n1\trow 1 of %d\n2\trow 2 of %d\n" % (k, k)
            )
            assert conn.execute("SELECT 1").fetchone() == (1,)

    run_threads(6, client)  # 6 clients, 4 servers
    with direct(pg) as c:
        assert c.execute(
            "SELECT count(*), sum(length(s)) FILTER (WHERE id = %s) FROM copy_t", (nrows,)
        ).fetchone() == (6 * (nrows + 1), sum(len(big + str(k)) for k in range(6)))


def test_psycopg_copy_failures_leave_server_usable(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    fresh_table(pg, "copy_bad", "id int, s text")

    def next_client_works() -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
            assert conn.execute("SELECT count(*) FROM copy_bad").fetchone() == (0,)
            assert conn.execute("SELECT current_setting('transaction_isolation')").fetchone()
            with conn.cursor().copy("COPY copy_bad FROM STDIN") as cp:
                cp.write_row((1, "ok"))
            assert conn.execute("SELECT count(*) FROM copy_bad").fetchone() == (1,)
            conn.execute("DELETE FROM copy_bad")

    # 1. bad data mid-way (autocommit): the server rejects the COPY
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        with (
            pytest.raises(E.InvalidTextRepresentation),
            conn.cursor().copy("COPY copy_bad FROM STDIN") as cp,
        ):
            for i in range(2000):
                cp.write(f"{i}\tgood\n")
            cp.write("not-an-int\tbad\n")
            for i in range(2000):
                cp.write(f"{i}\tafter\n")
        assert conn.execute("SELECT 'same client'").fetchone() == ("same client",)
    next_client_works()

    # 2. bad data inside an explicit transaction; the client rolls back
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        conn.execute("INSERT INTO copy_bad VALUES (-1, 'in tx')")
        with (
            pytest.raises(E.InvalidTextRepresentation),
            conn.cursor().copy("COPY copy_bad FROM STDIN") as cp,
        ):
            cp.write("1\tfine\nxx\tbad\n")
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM copy_bad").fetchone() == (0,)
        conn.rollback()
    next_client_works()

    # 3. the client gives up (CopyFail)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        with pytest.raises(ZeroDivisionError), conn.cursor().copy("COPY copy_bad FROM STDIN") as cp:
            cp.write_row((1, "a"))
            cp.write_row((2, "b"))
            _ = 1 / 0
        assert conn.execute("SELECT 'after copyfail'").fetchone() == ("after copyfail",)
    next_client_works()

    # 4. COPY TO STDOUT that fails mid-way (error after some rows were sent)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        got = []
        with (
            pytest.raises(E.DivisionByZero),
            conn.cursor().copy(
                "COPY (SELECT i, 1 / (i - 5000) FROM generate_series(1, 6000) i) TO STDOUT"
            ) as cp,
        ):
            for chunk in cp:
                got.append(chunk)
        assert conn.execute("SELECT 'after copy out error'").fetchone() == ("after copy out error",)
    next_client_works()

    with direct(pg) as c:
        assert c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' "
            "AND state <> 'idle' AND pid <> pg_backend_pid()"
        ).fetchone() == (0,)


def test_psql_killed_mid_copy_leaves_server_usable(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    fresh_table(pg, "copy_kill", "id int, s text")
    psql = subprocess.Popen(
        [
            pg_program(pg, "psql"),
            proxy.dsn(),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "COPY copy_kill FROM STDIN",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert psql.stdin is not None
    psql.stdin.write(b"".join(b"%d\trow\n" % i for i in range(5000)))
    psql.stdin.flush()
    deadline = time.monotonic() + 10
    with direct(pg) as c:
        while time.monotonic() < deadline:  # wait until the COPY is running on the server
            if c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY copy_kill%%' "
                "AND pid <> pg_backend_pid()"
            ).fetchone()[0]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("COPY never started on the server")
    psql.kill()
    psql.wait(10)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM copy_kill").fetchone() == (0,)
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE


# --------------------------------------------------------------------------------------------
# large results stream


def test_large_result_streams_without_buffering(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy=POOL4)
    assert proxy.pid is not None
    rows, width = 50_000, 1000  # 50 MB of text
    sql = f"SELECT i, repeat('x', {width}) FROM generate_series(1, {rows}) i"
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT 1")  # the pool and the session exist: measure from here
        base = vm_kb(proxy.pid, "VmRSS")
        peak = base

        stop = threading.Event()

        def sampler() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, vm_kb(proxy.pid, "VmRSS"))
                time.sleep(0.01)

        t = threading.Thread(target=sampler, daemon=True)
        t.start()
        try:
            # a slow reader: the proxy must apply back-pressure, not buffer the result
            n = total = 0
            last = 0
            for i, s in conn.cursor().stream(sql):
                n += 1
                total += len(s)
                last = i
                if n % 500 == 0:
                    time.sleep(0.002)
            assert (n, total, last) == (rows, rows * width, rows)
            # and a fast one, whole result at once
            cur = conn.execute(sql)
            got = cur.fetchall()
            assert len(got) == rows and sum(len(r[1]) for r in got) == rows * width
            del got
        finally:
            stop.set()
            t.join()
        assert conn.execute("SELECT 'still fine'").fetchone() == ("still fine",)
    grown_mb = (max(peak, vm_kb(proxy.pid, "VmHWM")) - base) / 1024
    assert grown_mb < 16, f"proxy RSS grew by {grown_mb:.1f} MB for a 50 MB result"


# --------------------------------------------------------------------------------------------
# psql


def _psql(pg: Any, proxy: Any, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pg_program(pg, "psql"), proxy.dsn(), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        **kw,
    )


def test_psql_multi_statement_c_script_and_copy(
    proxy_factory: Any, pg: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory(proxy=POOL4)
    with direct(pg) as c:
        c.execute("DROP TABLE IF EXISTS psql_t, psql_t2")

    r = _psql(
        pg,
        proxy,
        "-c",
        "CREATE TABLE psql_t (id int PRIMARY KEY, s text); "
        "INSERT INTO psql_t SELECT i, 'v' || i FROM generate_series(1, 100) i; "
        "SELECT count(*), sum(id) FROM psql_t; SELECT 'end'",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["CREATE TABLE", "INSERT 0 100", "100|5050", "end"]

    r = _psql(pg, proxy, "-c", "SELECT 1; SELECT 1/0; SELECT 3")
    assert r.returncode != 0 and "division by zero" in r.stderr
    assert "3" not in r.stdout.splitlines()

    data = tmp_path / "in.csv"
    data.write_text("".join(f'{i},"text, {i}"\n' for i in range(1, 501)))
    out = tmp_path / "out.csv"
    script = tmp_path / "script.sql"
    script.write_text(
        f"""
BEGIN;
CREATE TABLE psql_t2 (id int, s text);
\\copy psql_t2 FROM '{data}' WITH (FORMAT csv)
SELECT count(*), pg_backend_pid() = pg_backend_pid() FROM psql_t2;
INSERT INTO psql_t2 SELECT id + 1000, s FROM psql_t;
COMMIT;
BEGIN;
DELETE FROM psql_t2;
ROLLBACK;
\\copy (SELECT id, s FROM psql_t2 WHERE id <= 500 ORDER BY id) TO '{out}' WITH (FORMAT csv)
SELECT count(*), sum(id) FROM psql_t2;
"""
    )
    r = _psql(pg, proxy, "-f", str(script))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "BEGIN",
        "CREATE TABLE",
        "COPY 500",
        "500|t",
        "INSERT 0 100",
        "COMMIT",
        "BEGIN",
        "DELETE 600",
        "ROLLBACK",
        "COPY 500",
        "600|" + str(sum(range(1, 501)) + sum(range(1001, 1101))),
    ]
    assert out.read_text() == data.read_text()

    # many psql processes at once, more than the pool
    procs = [
        subprocess.Popen(
            [
                pg_program(pg, "psql"),
                proxy.dsn(),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                f"BEGIN; SELECT count(*) + {k} FROM psql_t; COMMIT",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(12)
    ]
    for k, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, stderr
        assert stdout.splitlines() == ["BEGIN", str(100 + k), "COMMIT"]


# --------------------------------------------------------------------------------------------
# protocol-level prepared statements


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_prepared_statement_follows_client_to_another_server(
    proxy_factory: Any, driver: str
) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 2})
    sql_tag = tag()
    holders: list[psycopg.Connection] = []
    if driver == "asyncpg":
        conn = await asyncpg.connect(proxy.url(), timeout=30)
        stmt = await conn.prepare(f"SELECT $1::int * 2, pg_backend_pid() /* {sql_tag} */")

        async def run(v: int) -> tuple[int, int]:
            return tuple(await stmt.fetchrow(v))  # type: ignore[return-value]

        close = functools.partial(aclose, conn)
    else:
        aconn = await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, connect_timeout=10
        )
        query = f"SELECT %s::int * 2, pg_backend_pid() /* {sql_tag} */"

        async def run(v: int) -> tuple[int, int]:
            cur = await aconn.execute(query, (v,), prepare=True)
            return await cur.fetchone()  # type: ignore[return-value]

        close = aconn.close
    try:
        doubled, first_pid = await run(21)
        assert doubled == 42
        # take the server the statement was prepared on away from the client
        b, b_pid = backend_pid_holding(proxy)
        holders.append(b)
        if b_pid != first_pid:
            c, c_pid = backend_pid_holding(proxy)  # the only other one: first_pid's
            holders.append(c)
            assert c_pid == first_pid
            b.commit()
        doubled, second_pid = await run(50)
        assert doubled == 100
        assert second_pid != first_pid
        for _ in range(3):
            assert (await run(7))[0] == 14
    finally:
        for h in holders:
            h.close()
        await close()


def test_same_sql_from_two_clients_shares_one_server_statement(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    t = tag()
    query = f"SELECT %s::int + 100 /* share-{t} */"
    conns = [psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) for _ in range(3)]
    try:
        for round_ in range(3):
            for k, conn in enumerate(conns):
                v = k * 10 + round_
                assert conn.execute(query, (v,), prepare=True).fetchone() == (v + 100,)
        with conns[0].transaction():
            rows = (
                conns[0]
                .execute(
                    "SELECT name FROM pg_prepared_statements WHERE statement LIKE %s",
                    (f"%share-{t}%",),
                )
                .fetchall()
            )
        assert len(rows) == 1, rows
    finally:
        for conn in conns:
            conn.close()


async def test_same_sql_from_two_asyncpg_clients_shares(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    t = tag()
    a = await asyncpg.connect(proxy.url(), timeout=30)
    b = await asyncpg.connect(proxy.url(), timeout=30)
    try:
        # round trips one client after the other (interleaved prepares: the test below)
        sa = await a.prepare(f"SELECT $1::int + 1 /* asy-{t} */")
        assert await sa.fetchval(-1) == 0
        sb = await b.prepare(f"SELECT $1::int + 1 /* asy-{t} */")
        assert await sb.fetchval(-2) == -1
        for i in range(5):
            assert await sa.fetchval(i) == i + 1
            assert await sb.fetchval(i * 2) == i * 2 + 1
        async with a.transaction():
            n = await a.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE $1",
                f"%asy-{t}%",
            )
        assert n == 1
    finally:
        await aclose(a)
        await aclose(b)


async def test_asyncpg_interleaved_prepares_on_one_server(proxy_factory: Any) -> None:
    """asyncpg prepares with Parse/Describe/Flush and no Sync.  Once the statement is
    described the proxy must not keep the only server for that client: a second client
    prepares and runs meanwhile, then the first one uses its statement."""
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    t = tag()
    a = await asyncpg.connect(proxy.url(), timeout=30)
    b = await asyncpg.connect(proxy.url(), timeout=30)
    try:
        sa = await asyncio.wait_for(a.prepare(f"SELECT $1::int * 3 /* ia-{t} */"), 10)
        sb = await asyncio.wait_for(b.prepare(f"SELECT $1::text || 'b' /* ib-{t} */"), 10)
        sb2 = await asyncio.wait_for(b.prepare(f"SELECT $1::int * 3 /* ia-{t} */"), 10)
        assert await asyncio.wait_for(sb.fetchval("x"), 10) == "xb"
        assert await asyncio.wait_for(sa.fetchval(5), 10) == 15
        assert await asyncio.wait_for(sb2.fetchval(7), 10) == 21
        async with a.transaction():
            sa3 = await a.prepare(f"SELECT $1::int - 1 /* ic-{t} */")
            assert await sa3.fetchval(10) == 9
            assert await a.fetchval("SELECT 1") == 1
        assert await asyncio.wait_for(sa3.fetchval(3), 10) == 2
    finally:
        await aclose(a)
        await aclose(b)


@pytest.mark.parametrize("command", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_deallocate_or_discard_all_then_reprepare(proxy_factory: Any, command: str) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    t = tag()
    q1 = f"SELECT %s::int * 5 /* d1-{t} */"
    q2 = f"SELECT %s::text || '!' /* d2-{t} */"
    with (
        psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as a,
        psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as b,
    ):
        for i in range(3):
            assert a.execute(q1, (i,), prepare=True).fetchone() == (i * 5,)
            assert b.execute(q1, (i,), prepare=True).fetchone() == (i * 5,)
            assert b.execute(q2, (f"b{i}",), prepare=True).fetchone() == (f"b{i}!",)
        a.execute(command)
        with a.transaction():
            assert a.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                (f"%-{t}%",),
            ).fetchone() == (0,)
        # the client that discarded prepares again; the other one's statements come back
        for i in range(3):
            assert a.execute(q1, (i + 10,), prepare=True).fetchone() == ((i + 10) * 5,)
            assert b.execute(q1, (i + 20,), prepare=True).fetchone() == ((i + 20) * 5,)
            assert b.execute(q2, (f"c{i}",), prepare=True).fetchone() == (f"c{i}!",)
        assert a.execute(q2, ("a",), prepare=True).fetchone() == ("a!",)
        with b.transaction():
            assert b.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                (f"%-{t}%",),
            ).fetchone() == (2,)


def test_max_prepared_statements_lru_bound(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1, "max_prepared_statements": 2})
    t = tag()
    queries = [f"SELECT %s::int + {j} /* lru{j}-{t} */" for j in range(5)]

    def client(k: int) -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
            for rnd in range(4):
                for j, q in enumerate(queries):
                    assert conn.execute(q, (k + rnd,), prepare=True).fetchone() == (k + rnd + j,)
                for j, q in reversed(list(enumerate(queries))):
                    assert conn.execute(q, (rnd,), prepare=True).fetchone() == (rnd + j,)

    run_threads(3, client)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        with conn.transaction():
            total, ours = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE statement LIKE %s) "
                "FROM pg_prepared_statements",
                (f"%-{t}%",),
            ).fetchone()
        assert total <= 2 and ours <= 2, (total, ours)


async def test_max_prepared_statements_lru_bound_asyncpg(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1, "max_prepared_statements": 2})
    t = tag()
    conn = await asyncpg.connect(proxy.url(), timeout=30)
    try:
        stmts = [await conn.prepare(f"SELECT $1::int + {j} /* alru-{t} */") for j in range(5)]
        for rnd in range(4):
            for j, s in enumerate(stmts):
                assert await s.fetchval(rnd) == rnd + j
            for j, s in reversed(list(enumerate(stmts))):
                assert await s.fetchval(rnd * 2) == rnd * 2 + j
        async with conn.transaction():
            n = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
        assert n <= 2
    finally:
        await aclose(conn)


def test_failed_parse_is_not_cached_psycopg(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    table = f"later_{tag()}"
    q = f"SELECT count(*) FROM {table} WHERE id > %s"
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as a:
        for _ in range(2):
            with pytest.raises(E.UndefinedTable):
                a.execute(q, (0,), prepare=True)
        with direct(pg) as c:
            c.execute(f"CREATE TABLE {table} (id int)")
            c.execute(f"INSERT INTO {table} VALUES (1), (2), (3)")
        for _ in range(3):
            assert a.execute(q, (1,), prepare=True).fetchone() == (2,)
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as b:
            for _ in range(3):
                assert b.execute(q, (0,), prepare=True).fetchone() == (3,)


async def test_failed_parse_is_not_cached_asyncpg(proxy_factory: Any, pg: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    table = f"later_{tag()}"
    conn = await asyncpg.connect(proxy.url(), timeout=30)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetchval(f"SELECT count(*) FROM {table}")
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.prepare(f"SELECT count(*) FROM {table}")
        with direct(pg) as c:
            c.execute(f"CREATE TABLE {table} (id int)")
            c.execute(f"INSERT INTO {table} VALUES (1), (2)")
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 2
        stmt = await conn.prepare(f"SELECT count(*) FROM {table}")
        assert await stmt.fetchval() == 2
    finally:
        await aclose(conn)


def test_failed_parse_fixed_name_reparsed_libpq(proxy_factory: Any, pg: Any) -> None:
    """libpq PQprepare with a fixed statement name: a Parse that failed leaves no statement
    behind in PostgreSQL, so the same name can be prepared again once the table exists."""
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    table = f"later_{tag()}"
    sql = f"SELECT count(*) FROM {table} WHERE id > $1".encode()
    conn = pq.PGconn.connect(proxy.dsn().encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    try:
        res = conn.prepare(b"my_stmt", sql)
        assert res.status == pq.ExecStatus.FATAL_ERROR
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"42P01"
        with direct(pg) as c:
            c.execute(f"CREATE TABLE {table} (id int)")
            c.execute(f"INSERT INTO {table} VALUES (1), (2), (3)")
        res = conn.prepare(b"my_stmt", sql)
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        res = conn.exec_prepared(b"my_stmt", [b"1"])
        assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
        assert res.get_value(0, 0) == b"2"
        # a second Parse of an existing name is an error, as in PostgreSQL
        res = conn.prepare(b"my_stmt", sql)
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"42P05"
        res = conn.exec_prepared(b"my_stmt", [b"0"])
        assert res.get_value(0, 0) == b"3"
    finally:
        conn.finish()


def test_psycopg_protocol_close_from_small_statement_cache(proxy_factory: Any, pg: Any) -> None:
    """psycopg (libpq >= 17) evicts from its statement cache with a protocol-level Close, which
    the proxy answers itself: outside a transaction, inside one, and inside a pipeline."""
    if pq.version() < 170000:
        pytest.skip("libpq < 17 deallocates with SQL, not a protocol Close")
    proxy = proxy_factory(proxy=POOL4)
    fresh_table(pg, "close_t", "client int, i int")
    t = tag()
    queries = [f"SELECT %s::int * {j + 1} /* cl{j}-{t} */" for j in range(6)]

    def client(k: int) -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.prepared_max = 2
            for rnd in range(3):
                for j, q in enumerate(queries):
                    assert conn.execute(q, (k + rnd,), prepare=True).fetchone() == (
                        (k + rnd) * (j + 1),
                    )
                with conn.transaction():
                    for j, q in enumerate(queries):
                        assert conn.execute(q, (rnd,), prepare=True).fetchone() == (rnd * (j + 1),)
                    conn.execute("INSERT INTO close_t VALUES (%s, %s)", (k, rnd), prepare=True)
                with conn.pipeline():
                    curs = [conn.execute(q, (k,), prepare=True) for q in reversed(queries)]
                    conn.execute("INSERT INTO close_t VALUES (%s, %s)", (k, 100 + rnd))
                for j, cur in zip(reversed(range(len(queries))), curs, strict=True):
                    assert cur.fetchone() == (k * (j + 1),)
            assert conn.execute(
                "SELECT count(*), sum(i) FROM close_t WHERE client = %s", (k,)
            ).fetchone() == (6, 0 + 1 + 2 + 100 + 101 + 102)

    run_threads(12, client)


async def test_large_parameters_through_prepared_statements(proxy_factory: Any) -> None:
    """Bind messages of named statements are rewritten by the proxy: multi-MB ones too."""
    proxy = proxy_factory(proxy={"default_pool_size": 2})
    big = "y" * (4 * 1024 * 1024 + 7)

    async def apg(k: int) -> None:
        conn = await asyncpg.connect(proxy.url(), timeout=30)
        try:
            stmt = await conn.prepare("SELECT length($1::text), md5($1::text), $2::int")
            for i in range(3):
                row = await stmt.fetchrow(big + str(k), i)
                assert tuple(row) == (len(big) + len(str(k)), _md5(big + str(k)), i)
            echoed = await conn.fetchval("SELECT $1::bytea", big.encode())
            assert echoed == big.encode()
        finally:
            await aclose(conn)

    async def pg3(k: int) -> None:
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, connect_timeout=10
        ) as conn:
            for i in range(3):
                cur = await conn.execute(
                    "SELECT length(%s::text), %s::text = %s::text",
                    (big, big + str(i), big + str(i)),
                    prepare=True,
                )
                assert await cur.fetchone() == (len(big), True)

    await gather(*(apg(k) for k in range(3)), *(pg3(k) for k in range(3)), timeout=15)


def _md5(s: str) -> str:
    import hashlib

    return hashlib.md5(s.encode()).hexdigest()


def test_large_request_while_startup_params_are_reapplied(proxy_factory: Any) -> None:
    """A client whose settings differ from the server's last user lands on it with a request
    bigger than 1 MiB: the proxy re-applies the settings first, then must read the rest."""
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    big = "z" * (2 * 1024 * 1024)
    a = psycopg.connect(proxy.dsn(application_name="a"), autocommit=True, connect_timeout=10)
    b = psycopg.connect(proxy.dsn(application_name="b"), autocommit=True, connect_timeout=10)
    try:
        assert a.execute("SELECT current_setting('application_name')").fetchone() == ("a",)

        def client_b(_: int) -> None:
            for i in range(3):
                assert b.execute(
                    "SELECT length(%s), current_setting('application_name'), %s::int",
                    (big, i),
                ).fetchone() == (len(big), "b", i)
                assert a.execute("SELECT current_setting('application_name')").fetchone() == ("a",)
            assert b.execute("SELECT 'small'").fetchone() == ("small",)

        run_threads(1, client_b, timeout=15)
    finally:
        a.close()
        b.close()
