"""Failure handling: cancels, clients and servers dying, bad passwords, malformed packets,
an unreachable upstream, SSL and protocol-version negotiation.

Protocol-level cases talk to the proxy over raw sockets with messages built here by hand,
independently of tvproxy's own protocol code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from harness import free_port, wait_until

PROTO_30 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


# --------------------------------------------------------------------------------------------
# a minimal, independent PostgreSQL v3 client over a raw socket


def startup_packet(params: dict[str, str], version: int = PROTO_30) -> bytes:
    body = struct.pack("!I", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def msg(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def query_msg(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def error_fields(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


class RawClient:
    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read_byte(self) -> bytes:
        assert self._fill(1), "connection closed"
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_msg(self) -> tuple[bytes, bytes] | None:
        """Next backend message, or None at EOF."""
        if not self._fill(5):
            return None
        mtype = self.buf[:1]
        (length,) = struct.unpack("!I", self.buf[1:5])
        if not self._fill(1 + length):
            return None
        body = self.buf[5:1 + length]
        self.buf = self.buf[1 + length:]
        return mtype, body

    def read_until(self, mtype: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            m = self.read_msg()
            assert m is not None, f"EOF before {mtype!r}; got {out}"
            out.append(m)
            if m[0] == mtype:
                return out

    def login(self, user: str = "postgres", database: str = "app", **params: str) -> list[Any]:
        self.send(startup_packet({"user": user, "database": database, **params}))
        msgs = self.read_until(b"Z")
        assert msgs[0] == (b"R", struct.pack("!I", 0)), msgs
        return msgs

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(query_msg(sql))
        return self.read_until(b"Z")

    def read_to_eof(self) -> list[tuple[bytes, bytes]]:
        """Everything the proxy sends until it closes the connection (asserts that it does)."""
        out = []
        while True:
            try:
                m = self.read_msg()
            except ConnectionResetError:
                return out
            if m is None:
                return out
            out.append(m)

    def abort(self) -> None:
        """Close with a TCP RST, as a killed process on another host would look."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def rows(msgs: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    out: list[list[str | None]] = []
    for mtype, body in msgs:
        if mtype == b"D":
            (n,) = struct.unpack("!H", body[:2])
            pos, row = 2, []
            for _ in range(n):
                (ln,) = struct.unpack("!i", body[pos:pos + 4])
                pos += 4
                if ln < 0:
                    row.append(None)
                else:
                    row.append(body[pos:pos + ln].decode())
                    pos += ln
            out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# helpers


def direct(pg: Any, db: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(pg.dsn(db), autocommit=True)




def idle_in_tx_count(pg: Any) -> int:
    with direct(pg) as c:
        return c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'"
            " AND state LIKE 'idle in transaction%'"
        ).fetchone()[0]  # type: ignore[index]


def advisory_lock_free(pg: Any, key: int) -> bool:
    with direct(pg, "app") as c:
        got = c.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]  # type: ignore[index]
        if got:
            c.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return bool(got)


def advisory_lock_held(pg: Any, key: int) -> bool:
    with direct(pg, "app") as c:
        return bool(c.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted",
            (key,)).fetchone()[0])  # type: ignore[index]


@pytest.fixture(autouse=True)
def no_leftover_backends(pg: Any) -> Iterator[None]:
    def count() -> int:
        with direct(pg) as c:
            return c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('app', 'app2')"
                " AND backend_type = 'client backend'"
                " AND application_name NOT LIKE 'tvproxy-listener %'").fetchone()[0]  # type: ignore[index]

    if not wait_until(lambda: count() == 0, 5):
        with direct(pg) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE datname IN ('app', 'app2') AND backend_type = 'client backend'")
    yield


@pytest.fixture
def table(pg: Any) -> str:
    name = f"f_{uuid.uuid4().hex[:8]}"
    with direct(pg, "app") as c:
        c.execute(f"CREATE TABLE {name} (id int, v text)")
    return name


# --------------------------------------------------------------------------------------------
# cancel


def test_cancel_pg_sleep_psycopg(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        for in_tx in (False, True):
            if in_tx:
                conn.execute("BEGIN")
            fut = pool.submit(conn.execute, "SELECT pg_sleep(30)")
            time.sleep(0.5)
            assert not fut.done()
            t0 = time.monotonic()
            conn.cancel()
            with pytest.raises(psycopg.errors.QueryCanceled) as ei:
                fut.result(timeout=5)
            assert time.monotonic() - t0 < 1.0
            assert ei.value.sqlstate == "57014"
            if in_tx:
                conn.execute("ROLLBACK")
            assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_cancel_asyncpg_timeout_and_task_cancel(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    conn = await asyncpg.connect(proxy.url())
    try:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 2) == 1
        assert time.monotonic() - t0 < 2.0

        task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 2) == 2
        assert time.monotonic() - t0 < 1.5
        # asyncpg's own error path: a statement_timeout style cancel arrives as 57014
        with pytest.raises(asyncpg.QueryCanceledError) as ei:
            async with conn.transaction():
                await conn.execute("SET LOCAL statement_timeout = '200ms'")
                await conn.fetchval("SELECT pg_sleep(5)")
        assert ei.value.sqlstate == "57014"
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()
    with direct(pg) as c:
        assert c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'"
                         " AND query LIKE '%pg_sleep(30)%' AND state = 'active'").fetchone() == (0,)


def test_cancel_race_never_hits_the_next_client(pg: Any, proxy_factory: Any) -> None:
    """PgBouncer's test_cancel_race (PR #717): pool_size 1, many cancels for client 1 while
    client 2 queues for the same server: client 2's query must not be cancelled."""
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    first = RawClient(proxy.host, proxy.port, timeout=10)
    keys = [b for t, b in first.login() if t == b"K"]
    assert len(keys) == 1
    pid, secret = struct.unpack("!iI", keys[0][:8])
    try:
        first.send(query_msg("SELECT pg_sleep(5)"))
        time.sleep(0.2)
        with psycopg.connect(proxy.dsn(), autocommit=True) as second, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(second.execute, "SELECT 7 FROM pg_sleep(0.5)")
            time.sleep(0.2)

            def cancel() -> None:
                with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
                    s.sendall(struct.pack("!IIiI", 16, 80877102, pid, secret))
                    s.recv(1)

            with concurrent.futures.ThreadPoolExecutor(50) as cancels:
                list(cancels.map(lambda _: cancel(), range(200)))
            out = first.read_until(b"Z")
            errs = [error_fields(b) for t, b in out if t == b"E"]
            assert errs and errs[0].get("C") == "57014", out
            assert fut.result(timeout=10).fetchone() == (7,)
    finally:
        first.close()


def test_cancel_of_idle_client_is_harmless(pg: Any, proxy_factory: Any) -> None:
    """A cancel sent while the client runs nothing must not hit another client's query."""
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as idle, \
            psycopg.connect(proxy.dsn(), autocommit=True) as busy:
        idle.execute("SELECT 1")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(busy.execute, "SELECT 9 FROM pg_sleep(1)")
            time.sleep(0.3)
            idle.cancel()
            assert fut.result(timeout=5).fetchone() == (9,)
            assert busy.execute("SELECT 10").fetchone() == (10,)


# --------------------------------------------------------------------------------------------
# clients dying mid-transaction


def test_psql_killed_mid_transaction_releases_everything(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    key = 4242
    psql = subprocess.Popen(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", proxy.dsn()],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert psql.stdin is not None
        psql.stdin.write(f"BEGIN;\nSELECT pg_advisory_xact_lock({key});\n".encode())
        psql.stdin.flush()
        assert wait_until(lambda: advisory_lock_held(pg, key), 5)
        assert idle_in_tx_count(pg) == 1
        psql.kill()
        psql.wait(5)
    finally:
        if psql.poll() is None:
            psql.kill()
            psql.wait(5)
    assert wait_until(lambda: idle_in_tx_count(pg) == 0, 3)
    assert advisory_lock_free(pg, key)
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        # simple protocol, one statement: its own transaction, not the dead client's
        row = c.execute(f"SELECT pg_try_advisory_xact_lock({key}), now() = statement_timestamp()"
                        ).fetchone()
        assert row == (True, True)


def test_raw_client_reset_mid_transaction_rolls_back(pg: Any, proxy_factory: Any,
                                                     table: str) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    key = 4243
    raw = RawClient(proxy.host, proxy.port)
    raw.login()
    out = raw.query(f"BEGIN; INSERT INTO {table} VALUES (1, 'lost');"
                    f" SELECT pg_advisory_xact_lock({key})")
    assert out[-1] == (b"Z", b"T")
    assert advisory_lock_held(pg, key)
    raw.abort()
    assert wait_until(lambda: idle_in_tx_count(pg) == 0, 3)
    assert advisory_lock_free(pg, key)
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        assert c.execute("SELECT now() = statement_timestamp()").fetchone() == (True,)


def test_psycopg_socket_closed_abruptly_mid_transaction(pg: Any, proxy_factory: Any,
                                                        table: str) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    conn = psycopg.connect(proxy.dsn())
    conn.execute(f"INSERT INTO {table} VALUES (2, 'lost')")
    conn.execute("SELECT pg_advisory_xact_lock(4244)")
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    try:
        assert wait_until(lambda: idle_in_tx_count(pg) == 0, 3)
        assert advisory_lock_free(pg, 4244)
        with psycopg.connect(proxy.dsn(), autocommit=True) as c:
            assert c.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    finally:
        conn.close()


def test_client_gone_with_query_in_flight_never_returns_dirty_server(
    pg: Any, proxy_factory: Any, table: str
) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    raw = RawClient(proxy.host, proxy.port)
    raw.login()
    raw.send(query_msg(f"BEGIN; INSERT INTO {table} VALUES (3, 'lost'); SELECT pg_sleep(1.5)"))
    time.sleep(0.3)
    raw.abort()
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        # whatever server this lands on, it is not inside the dead client's transaction
        row = c.execute(f"SELECT now() = statement_timestamp(), (SELECT count(*) FROM {table})"
                        ).fetchone()
        assert row == (True, 0)
    assert wait_until(lambda: idle_in_tx_count(pg) == 0, 4)
    with direct(pg, "app") as d:
        assert d.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


# --------------------------------------------------------------------------------------------
# servers dying


def test_terminated_server_gives_client_an_error_and_pool_heals(pg: Any,
                                                                proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    bystander = psycopg.connect(proxy.dsn(), autocommit=True)
    victim = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        victim.execute("BEGIN")
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with direct(pg) as d:
            assert d.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert time.monotonic() - t0 < 3
        # the next client (and one connected before) work, on a new backend
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(proxy.dsn(), autocommit=True) as nxt:
            new_pid = nxt.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            assert new_pid != pid
    finally:
        victim.close()
        bystander.close()


def test_terminated_idle_server_is_dropped_from_pool(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"default_pool_size": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with direct(pg) as d:
            d.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.5)
        assert c.execute("SELECT pg_backend_pid() <> %s", (pid,)).fetchone() == (True,)


# --------------------------------------------------------------------------------------------
# wrong password


async def test_wrong_password_28p01_others_unaffected(pg: Any, proxy_factory: Any,
                                                      table: str) -> None:
    proxy = proxy_factory(auth={"auth_type": "md5"}, userlist={"postgres": "s3cret"})
    good = await asyncpg.connect(proxy.url(password="s3cret"))
    try:
        tr = good.transaction()
        await tr.start()
        await good.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
        with pytest.raises(asyncpg.InvalidPasswordError) as ei:
            await asyncio.wait_for(asyncpg.connect(proxy.url(password="wrong")), 5)
        assert ei.value.sqlstate == "28P01"
        with pytest.raises(psycopg.OperationalError) as pe:
            psycopg.connect(proxy.dsn(password="wrong"), connect_timeout=5)
        assert "password authentication failed" in str(pe.value)
        await good.execute(f"INSERT INTO {table} VALUES (2, 'kept')")
        await tr.commit()
        assert await good.fetchval(f"SELECT count(*) FROM {table}") == 2
    finally:
        await good.close()


# --------------------------------------------------------------------------------------------
# malformed packets


BEFORE_LOGIN = {
    "startup_length_lt_8": b"\x00\x00\x00\x03garbage",
    "startup_length_huge": struct.pack("!II", 0x7FFFFFFF, PROTO_30) + b"user\0postgres\0",
    "startup_garbage": bytes(range(7, 71)),
    "startup_protocol_2": startup_packet({"user": "postgres", "database": "app"}, 2 << 16),
    "startup_no_terminator": struct.pack("!II", 20, PROTO_30) + b"user\0postgres",
    "password_before_auth": msg(b"p", b"pw\0"),
}
AFTER_LOGIN = {
    "invalid_type": msg(b"!", b"junk"),
    "length_lt_4": b"Q\x00\x00\x00\x02",
    "length_huge": b"Q\x7f\xff\xff\xf0",
    "bind_truncated": msg(b"B", b"\0") + msg(b"S"),
    "parse_bad_param_count": msg(b"P", b"s1\0SELECT 1\0" + struct.pack("!H", 5)) + msg(b"S"),
}


@pytest.fixture
def victim_tx(pg: Any, proxy_factory: Any, table: str) -> Iterator[tuple[Any, psycopg.Connection, str]]:
    """A proxy and a bystander client with an open transaction (pool_size 2)."""
    proxy = proxy_factory(proxy={"default_pool_size": 2})
    conn = psycopg.connect(proxy.dsn())
    conn.execute(f"INSERT INTO {table} VALUES (1, 'bystander')")
    yield proxy, conn, table
    conn.close()


def _bystander_still_fine(conn: psycopg.Connection, table: str, proxy: Any) -> None:
    conn.execute(f"INSERT INTO {table} VALUES (2, 'bystander')")
    conn.commit()
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
    conn.commit()
    assert proxy.running
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("case", sorted(BEFORE_LOGIN))
def test_malformed_startup_closes_only_that_connection(victim_tx: Any, case: str) -> None:
    proxy, conn, table = victim_tx
    raw = RawClient(proxy.host, proxy.port)
    raw.send(BEFORE_LOGIN[case])
    msgs = raw.read_to_eof()
    raw.close()
    assert all(m[0] == b"E" for m in msgs), msgs
    if case == "startup_protocol_2":
        assert msgs and error_fields(msgs[0][1]).get("C") == "0A000"
    elif msgs:
        assert error_fields(msgs[0][1]).get("C") == "08P01", msgs
    _bystander_still_fine(conn, table, proxy)
    assert wait_until(lambda: "protocol" in proxy.logs(), 2), proxy.logs()


@pytest.mark.parametrize("case", sorted(AFTER_LOGIN))
def test_malformed_message_after_login_closes_only_that_connection(victim_tx: Any,
                                                                   case: str) -> None:
    proxy, conn, table = victim_tx
    raw = RawClient(proxy.host, proxy.port)
    raw.login()
    assert rows(raw.query("SELECT 41 + 1")) == [["42"]]
    raw.send(AFTER_LOGIN[case])
    msgs = raw.read_to_eof()
    raw.close()
    errs = [error_fields(b) for t, b in msgs if t == b"E"]
    # 08P01 protocol_violation; 54000 program_limit_exceeded for an oversized message
    assert errs and errs[-1].get("C") in ("08P01", "54000"), msgs
    assert wait_until(lambda: "protocol error" in proxy.logs(), 2), proxy.logs()
    _bystander_still_fine(conn, table, proxy)


def test_bind_without_parse_is_answered_by_the_server(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    raw = RawClient(proxy.host, proxy.port, timeout=3)
    raw.login()
    raw.send(msg(b"B", b"\0nosuch\0" + struct.pack("!HHH", 0, 0, 0)) + msg(b"S"))
    out = raw.read_until(b"Z")
    assert out[0][0] == b"E" and error_fields(out[0][1])["C"] == "26000"
    assert rows(raw.query("SELECT 'still here'")) == [["still here"]]
    raw.close()


@pytest.mark.parametrize("in_transaction", [False, True])
def test_truncated_message_then_close(pg: Any, victim_tx: Any, in_transaction: bool) -> None:
    proxy, conn, table = victim_tx
    raw = RawClient(proxy.host, proxy.port)
    raw.login()
    if in_transaction:
        assert raw.query(f"BEGIN; INSERT INTO {table} VALUES (99, 'lost')")[-1] == (b"Z", b"T")
    raw.send(b"Q\x00\x00\x00\x40SELECT 1; SEL")
    time.sleep(0.2)
    raw.close()
    _bystander_still_fine(conn, table, proxy)
    assert wait_until(lambda: idle_in_tx_count(pg) == 0, 3)
    with direct(pg, "app") as d:
        assert d.execute(f"SELECT count(*) FROM {table} WHERE id = 99").fetchone() == (0,)


# --------------------------------------------------------------------------------------------
# unreachable upstream


def test_unreachable_upstream_gives_clear_error_quickly(pg: Any, proxy_factory: Any) -> None:
    dead = {"host": "127.0.0.1", "port": free_port(), "dbname": "app", "user": pg.user}
    proxy = proxy_factory(databases={"dead": dead}, proxy={"server_connect_timeout": 2})
    for _ in range(2):  # first attempt and the fail-fast one after it
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as ei:
            psycopg.connect(proxy.dsn("dead"), connect_timeout=10)
        assert time.monotonic() - t0 < 3
        text = str(ei.value)
        assert ei.value.sqlstate == "08006" or "server" in text, text
    # the other databases are not affected
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


async def test_unreachable_upstream_asyncpg_sqlstate(pg: Any, proxy_factory: Any) -> None:
    dead = {"host": "127.0.0.1", "port": free_port(), "dbname": "app", "user": pg.user}
    proxy = proxy_factory(databases={"dead": dead})
    t0 = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as ei:
        await asyncio.wait_for(asyncpg.connect(proxy.url("dead")), 10)
    assert time.monotonic() - t0 < 3
    assert ei.value.sqlstate == "08006" or "server" in str(ei.value), ei.value


# --------------------------------------------------------------------------------------------
# SSLRequest, GSSENCRequest, protocol negotiation


@pytest.mark.parametrize("code", [SSL_REQUEST, GSSENC_REQUEST])
def test_ssl_and_gssenc_request_get_n_then_startup_works(pg: Any, proxy_factory: Any,
                                                          code: int) -> None:
    proxy = proxy_factory()
    raw = RawClient(proxy.host, proxy.port)
    raw.send(struct.pack("!II", 8, code))
    assert raw.read_byte() == b"N"
    raw.login()
    assert rows(raw.query("SELECT 'plain'")) == [["plain"]]
    raw.close()


def test_libpq_sslmode_prefer_and_require(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(sslmode="prefer"), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=5)
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize(
    "version,options",
    [((3 << 16) | 1, {}), ((3 << 16) | 2, {"_pq_.compression": "on"}), (PROTO_30, {"_pq_.x": "1"})],
)
def test_negotiate_protocol_version(pg: Any, proxy_factory: Any, version: int,
                                    options: dict[str, str]) -> None:
    proxy = proxy_factory()
    raw = RawClient(proxy.host, proxy.port)
    raw.send(startup_packet({"user": "postgres", "database": "app", **options}, version))
    first = raw.read_msg()
    assert first is not None and first[0] == b"v", first
    body = first[1]
    minor, count = struct.unpack("!II", body[:8])
    names = [n.decode() for n in body[8:].split(b"\0") if n]
    assert minor == 0
    assert count == len(options) and names == list(options)
    msgs = raw.read_until(b"Z")
    assert msgs[0] == (b"R", struct.pack("!I", 0))
    assert rows(raw.query("SELECT 'negotiated'")) == [["negotiated"]]
    raw.close()


def test_cancel_request_with_unknown_key_is_ignored(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(), autocommit=True) as c, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.execute, "SELECT 1 FROM pg_sleep(0.8)")
        time.sleep(0.2)
        raw = RawClient(proxy.host, proxy.port)
        raw.send(struct.pack("!IIii", 16, 80877102, 12345, 67890))
        assert raw.read_to_eof() == []
        raw.close()
        assert fut.result(timeout=5).fetchone() == (1,)
