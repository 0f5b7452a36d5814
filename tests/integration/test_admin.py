"""The admin console (databases ``pgbouncer`` and ``tvproxy``) through a real tvproxy.

Column lists are PgBouncer 1.2x's (src/admin.c, src/stats.c); they are checked through psql
(simple protocol), psycopg 3 (simple, extended with ``prepare=True``, binary, pipeline) and
asyncpg (extended, binary results), and the unmodified prometheus-pgbouncer-exporter scrapes it.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors

from tvproxy.admin import commands as C

COLUMNS = {
    "POOLS": [
        "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
        "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
        "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
        "load_balance_hosts",
    ],
    "STATS": [
        "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
        "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
        "total_client_parse_count", "total_server_parse_count", "total_bind_count",
        "total_client_login_count", "avg_server_assignment_count", "avg_xact_count",
        "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
        "avg_wait_time", "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
        "avg_client_login_count",
    ],
    "STATS_TOTALS": [
        "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
        "bytes_sent", "xact_time", "query_time", "wait_time", "client_parse_count",
        "server_parse_count", "bind_count", "client_login_count",
    ],
    "STATS_AVERAGES": [
        "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
        "bytes_sent", "xact_time", "query_time", "wait_time", "avg_client_parse_count",
        "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
    ],
    "TOTALS": ["name", "value"],
    "CLIENTS": [
        "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
        "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
        "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
    ],
    "DATABASES": [
        "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
        "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
        "max_connections", "current_connections", "max_client_connections",
        "current_client_connections", "paused", "disabled",
    ],
    "USERS": [
        "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
        "current_connections", "max_user_client_connections", "current_client_connections",
    ],
    "CONFIG": ["key", "value", "default", "changeable"],
    "LISTS": ["list", "items"],
    "VERSION": ["version"],
    "STATE": ["key", "value"],
    "MEM": ["name", "size", "used", "free", "memtotal"],
    "DNS_HOSTS": ["hostname", "ttl", "addrs"],
    "DNS_ZONES": ["zonename", "serial", "count"],
    "PEERS": ["peer_id", "host", "port", "pool_size"],
    "PEER_POOLS": [
        "peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login",
    ],
    "FDS": [
        "fd", "task", "user", "database", "addr", "port", "cancel", "link", "client_encoding",
        "std_strings", "datestyle", "timezone", "password", "scram_client_key",
        "scram_server_key",
    ],
    "TVIEWS": [
        "database", "tview", "entity", "pk_column", "sources", "depends_on", "strategy", "rows",
        "created_at",
    ],
    "TVIEW STATS": [
        "database", "tview", "commits", "keys_enqueued", "keys_coalesced", "rows_refreshed",
        "rows_deleted", "cascade_rows", "full_refreshes", "refresh_statements", "errors",
        "total_refresh_us", "avg_refresh_us", "max_refresh_us", "last_refresh_at",
    ],
    "TVIEW QUEUE": ["client_id", "database", "entity", "keys", "savepoint_depth", "age_us"],
    "TVIEW PENDING": ["gid", "database", "keys", "prepared_at", "state"],
}
COLUMNS["SERVERS"] = COLUMNS["CLIENTS"]
COLUMNS["SOCKETS"] = COLUMNS["ACTIVE_SOCKETS"] = COLUMNS["CLIENTS"] + [
    "recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail",
]


def admin(proxy: Any, user: str = "postgres", dbname: str = "pgbouncer") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=dbname, user=user), autocommit=True)


def app(proxy: Any) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname="app"), autocommit=True)


def show(conn: psycopg.Connection, what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def pool_row(conn: psycopg.Connection, db: str = "app") -> dict[str, Any]:
    (row,) = [r for r in show(conn, "POOLS") if r["database"] == db]
    return row


def psql(proxy: Any, sql: str, user: str = "postgres", dbname: str = "pgbouncer",
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1",
         proxy.dsn(dbname=dbname, user=user), "-c", sql],
        capture_output=True, text=True, timeout=30, check=check,
    )


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# --- column sets, every client ------------------------------------------------------------------

def test_every_show_has_pgbouncer_columns_psql(proxy: Any) -> None:
    for what, cols in COLUMNS.items():
        out = psql(proxy, f"SHOW {what}").stdout.splitlines()
        assert out[0].split("|") == cols, what
    assert len(COLUMNS["POOLS"]) == 17 and len(COLUMNS["STATS"]) == 25
    assert len(COLUMNS["CLIENTS"]) == 21 and len(COLUMNS["DATABASES"]) == 17


@pytest.mark.parametrize("mode", ["simple", "prepare", "binary", "pipeline"])
def test_every_show_has_pgbouncer_columns_psycopg(proxy: Any, mode: str) -> None:
    with admin(proxy) as conn:
        for what, cols in COLUMNS.items():
            if mode == "pipeline":
                with conn.pipeline():
                    cur = conn.execute(f"SHOW {what}")
                rows = cur.fetchall()
            else:
                kwargs = {"prepare": True} if mode == "prepare" else {}
                cur = conn.cursor(binary=mode == "binary")
                cur.execute(f"SHOW {what}", **kwargs)
                rows = cur.fetchall()
            assert [d.name for d in cur.description] == cols, what
            assert all(len(r) == len(cols) for r in rows)
        if mode != "simple":  # ints come back as ints in every format
            (row,) = [r for r in show(conn, "LISTS") if r["list"] == "used_clients"]
            assert isinstance(row["items"], int) and row["items"] >= 1


async def test_every_show_has_pgbouncer_columns_asyncpg(proxy: Any) -> None:
    conn = await asyncpg.connect(proxy.url(dbname="pgbouncer", user="postgres"))
    try:
        for what, cols in COLUMNS.items():
            stmt = await conn.prepare(f"SHOW {what}")
            assert [a.name for a in stmt.get_attributes()] == cols, what
            await stmt.fetch()
        rows = await conn.fetch("SHOW LISTS")  # binary int8 results
        assert {r["list"]: r["items"] for r in rows}["used_clients"] >= 1
        version = await conn.fetchval("SHOW VERSION")
        assert version.startswith("PgBouncer ") and "tvproxy" in version
        await conn.execute("SHOW POOLS; SHOW STATS")  # simple protocol, two statements
    finally:
        await conn.close()


def test_version_help_state_and_tvproxy_alias(proxy: Any) -> None:
    with admin(proxy, dbname="tvproxy") as conn:
        (version,) = conn.execute("SHOW VERSION").fetchone()
        assert version == C.VERSION_STRING
        assert version.startswith(f"PgBouncer {C.PGBOUNCER_COMPAT} ")
        notices: list[Any] = []
        conn.add_notice_handler(lambda d: notices.append((d.message_primary, d.message_detail)))
        cur = conn.execute("SHOW HELP")
        assert cur.description is None and cur.statusmessage == "SHOW"
        assert notices[0][0] == "Console usage" and "SHOW HELP|CONFIG" in notices[0][1]
        state = {r["key"]: r["value"] for r in show(conn, "STATE")}
        assert state == {"active": "yes", "paused": "no", "suspended": "no"}
        dbs = {r["name"]: r for r in show(conn, "DATABASES")}
        assert {"app", "app2", "pgbouncer", "tvproxy"} <= set(dbs)
        assert dbs["app"]["database"] == "app" and dbs["app"]["pool_size"] == 4
        assert dbs["pgbouncer"]["pool_mode"] == "statement"


def test_multiple_statements_and_errors_psql(proxy: Any) -> None:
    out = psql(proxy, "SHOW VERSION; SHOW STATE;").stdout
    assert "PgBouncer" in out and "suspended|no" in out
    bad = psql(proxy, "SHOW NONSENSE", check=False)
    assert bad.returncode != 0
    assert "invalid command 'SHOW NONSENSE', use SHOW HELP;" in bad.stderr
    with admin(proxy) as conn, pytest.raises(errors.SyntaxError):
        conn.execute("SHOW NONSENSE")


def test_unknown_command_extended_protocol_recovers(proxy: Any) -> None:
    with admin(proxy) as conn:
        with pytest.raises(errors.SyntaxError):
            conn.execute("FROB", prepare=True)
        assert conn.execute("SHOW VERSION", prepare=True).fetchone()[0].startswith("PgBouncer")


# --- what the figures say --------------------------------------------------------------------------

def test_stats_clients_servers_after_traffic(proxy: Any) -> None:
    with app(proxy) as client, admin(proxy) as conn:
        client.execute("SET application_name = 'admin-test'")
        for _ in range(3):
            client.execute("SELECT 1")
        with client.transaction():
            backend_pid = client.execute("SELECT pg_backend_pid()").fetchone()[0]
            clients = show(conn, "CLIENTS")
            servers = show(conn, "SERVERS")
            pool = pool_row(conn)
        mine = [c for c in clients if c["database"] == "app"]
        assert len(mine) == 1 and mine[0]["state"] == "active" and mine[0]["type"] == "C"
        assert mine[0]["application_name"] == "admin-test"
        assert mine[0]["link"] != ""
        assert any(c["database"] == "pgbouncer" for c in clients)  # the console itself
        linked = [s for s in servers if s["state"] == "active"]
        assert len(linked) == 1 and linked[0]["remote_pid"] == backend_pid
        assert linked[0]["link"] == mine[0]["ptr"] and linked[0]["type"] == "S"
        assert pool["cl_active"] == 1 and pool["sv_active"] == 1
        assert pool["pool_mode"] == "transaction" and pool["cl_waiting"] == 0

        stats = {r["database"]: r for r in show(conn, "STATS")}
        assert stats["app"]["total_xact_count"] >= 4
        assert stats["app"]["total_query_count"] >= 4
        assert stats["app"]["total_received"] > 0 and stats["app"]["total_sent"] > 0
        assert stats["app"]["total_client_login_count"] >= 1
        totals = {r["name"]: r["value"] for r in show(conn, "TOTALS")}
        assert totals["total_xact_count"] >= 4
        assert len(totals) == 24
        st = {r["database"]: r for r in show(conn, "STATS_TOTALS")}
        assert st["app"]["xact_count"] == stats["app"]["total_xact_count"]
        users = {r["name"]: r for r in show(conn, "USERS")}
        assert users["postgres"]["current_connections"] >= 1
        lists = {r["list"]: r["items"] for r in show(conn, "LISTS")}
        assert lists["pools"] >= 1 and lists["used_clients"] >= 2 and lists["used_servers"] >= 1

        idle = [c for c in show(conn, "CLIENTS") if c["database"] == "app"]
        assert idle[0]["state"] == "idle" and idle[0]["link"] == ""
        assert pool_row(conn)["sv_idle"] >= 1


def test_stats_user_can_show_but_not_control(proxy: Any) -> None:
    with admin(proxy, user="stats") as conn:
        assert show(conn, "POOLS") is not None
        assert show(conn, "STATS") is not None
        for cmd in ("PAUSE", "PAUSE app", "RELOAD", "SET default_pool_size = 7", "KILL app",
                    "SHOW FDS", "SHUTDOWN", "SUSPEND", "RECONNECT"):
            with pytest.raises(errors.InsufficientPrivilege, match="admin access needed"):
                conn.execute(cmd)
        conn.execute("SET client_encoding = 'UTF8'")  # drivers' settings are accepted, ignored
    bad = psql(proxy, "RELOAD", user="stats", check=False)
    assert "admin access needed" in bad.stderr


async def test_non_admin_user_refused(proxy: Any) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await asyncpg.connect(proxy.url(dbname="pgbouncer", user="nobody"))
    assert info.value.sqlstate == "28000"
    assert 'not allowed to connect to admin console as "nobody"' in str(info.value)
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        admin(proxy, user="nobody", dbname="tvproxy")


# --- the wire, message by message ------------------------------------------------------------

def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


class Wire:
    """A bare protocol-3 connection to the console (trust auth), to check exact replies."""

    def __init__(self, proxy: Any, user: str = "postgres") -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
        params = b"user\0" + user.encode() + b"\0database\0pgbouncer\0\0"
        body = struct.pack("!I", 196608) + params
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self.buf = b""
        assert self.until(b"Z")[-1] == (b"Z", b"I")

    def send(self, *msgs: bytes) -> None:
        self.sock.sendall(b"".join(msgs))

    def read(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!I", self.buf[1:5])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        n = 1 + struct.unpack("!I", self.buf[1:5])[0]
        msg, self.buf = self.buf[:n], self.buf[n:]
        return msg[:1], msg[5:]

    def until(self, kind: bytes) -> list[tuple[bytes, bytes]]:
        out = [self.read()]
        while out[-1][0] != kind:
            out.append(self.read())
        return out

    def close(self) -> None:
        self.sock.close()


def _parse(name: bytes, sql: bytes) -> bytes:
    return _msg(b"P", name + b"\0" + sql + b"\0\0\0")


def _bind(portal: bytes, name: bytes, formats: tuple[int, ...] = ()) -> bytes:
    fmt = struct.pack("!H", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    return _msg(b"B", portal + b"\0" + name + b"\0\0\0\0\0" + fmt)


def test_extended_protocol_exact_replies(proxy: Any) -> None:
    w = Wire(proxy)
    try:
        # pipelined: a good statement, a bad one, then everything up to Sync is skipped
        w.send(
            _parse(b"s1", b"SHOW VERSION"), _bind(b"", b"s1"), _msg(b"D", b"P\0"),
            _msg(b"E", b"\0\0\0\0\0"), _parse(b"", b"FROB"), _bind(b"", b""),
            _msg(b"E", b"\0\0\0\0\0"), _msg(b"S"),
        )
        kinds = [k for k, _ in w.until(b"Z")]
        assert kinds == [b"1", b"2", b"T", b"D", b"C", b"E", b"Z"]
        # Describe statement: no parameters, the columns; a binary int8 column
        w.send(_parse(b"s2", b"SHOW LISTS"), _msg(b"D", b"Ss2\0"), _bind(b"p", b"s2", (1,)),
               _msg(b"E", b"p\0\0\0\0\0"), _msg(b"C", b"Ss2\0"), _msg(b"C", b"Pp\0"),
               _msg(b"H"), _msg(b"S"))
        replies = w.until(b"Z")
        assert [k for k, _ in replies[:3]] == [b"1", b"t", b"T"]
        assert replies[1][1] == b"\0\0"
        rows = [body for k, body in replies if k == b"D"]
        assert len(rows) == 14
        ncols, l1 = struct.unpack("!Hi", rows[0][:6])
        assert ncols == 2 and rows[0][6:6 + l1] == b"databases"
        (l2,) = struct.unpack("!i", rows[0][6 + l1:10 + l1])
        assert l2 == 8  # int8 in binary
        assert [k for k, _ in replies[-4:]] == [b"C", b"3", b"3", b"Z"]
        # the closed statement is gone; a duplicate name is refused; empty query
        w.send(_bind(b"", b"s2"), _msg(b"S"), _parse(b"s1", b"SHOW STATE"), _msg(b"S"),
               _parse(b"", b""), _bind(b"", b""), _msg(b"E", b"\0\0\0\0\0"), _msg(b"S"))
        err = w.until(b"Z")
        assert err[0][0] == b"E" and b"C26000" in err[0][1]
        dup = w.until(b"Z")
        assert dup[0][0] == b"E" and b"C42P05" in dup[0][1]
        assert [k for k, _ in w.until(b"Z")] == [b"1", b"2", b"I", b"Z"]
        # simple query: the second statement fails, the third never runs; a syntax error
        # anywhere fails the whole string before anything runs (as PostgreSQL)
        w.send(_msg(b"Q", b"SHOW STATE; PAUSE nope; SHOW VERSION\0"))
        kinds = [k for k, _ in w.until(b"Z")]
        assert kinds == [b"T", b"D", b"D", b"D", b"C", b"E", b"Z"]
        w.send(_msg(b"Q", b"SHOW STATE; FROB\0"))
        assert [k for k, _ in w.until(b"Z")] == [b"E", b"Z"]
        w.send(_msg(b"Q", b";\0"))
        assert [k for k, _ in w.until(b"Z")] == [b"I", b"Z"]
        # an unknown message type ends the connection with a FATAL
        w.send(_msg(b"?", b""))
        kind, body = w.read()
        assert kind == b"E" and b"FATAL" in body
    finally:
        w.close()


def test_disable_enable(proxy: Any) -> None:
    with admin(proxy) as conn:
        conn.execute("DISABLE app")
        assert {r["name"]: r for r in show(conn, "DATABASES")}["app"]["disabled"] == 1
        with pytest.raises(psycopg.OperationalError):
            app(proxy)
        conn.execute("ENABLE app")
        with app(proxy) as client:
            assert client.execute("SELECT 1").fetchone()[0] == 1


# --- control commands ----------------------------------------------------------------------------

def test_pause_blocks_queries_until_resume(proxy: Any) -> None:
    with app(proxy) as client, admin(proxy) as conn:
        client.execute("SELECT 1")
        assert conn.execute("PAUSE app").statusmessage == "PAUSE"
        dbs = {r["name"]: r for r in show(conn, "DATABASES")}
        assert dbs["app"]["paused"] == 1 and dbs["app2"]["paused"] == 0
        with pytest.raises(errors.Error, match="no such database: nope"):
            conn.execute("PAUSE nope")
        with pytest.raises(errors.Error, match="cannot pause admin db"):
            conn.execute("PAUSE pgbouncer")

        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            result.append(client.execute("SELECT 42").fetchone()[0])
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_for(lambda: pool_row(conn)["cl_waiting"] == 1)
        assert not done.wait(0.3)
        row = pool_row(conn)
        assert row["maxwait"] * 1_000_000 + row["maxwait_us"] > 0
        waiting = [c for c in show(conn, "CLIENTS") if c["database"] == "app"]
        assert waiting[0]["state"] == "waiting"
        assert conn.execute("RESUME app").statusmessage == "RESUME"
        assert done.wait(10) and result == [42]
        t.join(5)
        with pytest.raises(errors.Error, match="not paused"):
            conn.execute("RESUME app")


def test_pause_waits_for_running_transaction(proxy: Any) -> None:
    with app(proxy) as client, admin(proxy) as conn:
        client.execute("BEGIN")
        client.execute("SELECT 1")
        paused = threading.Event()

        def run() -> None:
            with admin(proxy) as other:
                other.execute("PAUSE")
            paused.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert not paused.wait(0.5)  # the transaction still holds its server
        state = {r["key"]: r["value"] for r in show(conn, "STATE")}
        assert state["paused"] == "yes"
        client.execute("COMMIT")
        assert paused.wait(10)
        t.join(5)
        with pytest.raises(errors.Error, match="already suspended/paused"):
            conn.execute("PAUSE")
        conn.execute("RESUME")
        assert client.execute("SELECT 7").fetchone()[0] == 7


def test_reconnect_gives_a_new_backend(proxy: Any) -> None:
    with app(proxy) as client, admin(proxy) as conn:
        pid1 = client.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert client.execute("SELECT pg_backend_pid()").fetchone()[0] == pid1
        assert conn.execute("RECONNECT app").statusmessage == "RECONNECT"
        pid2 = client.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pid2 != pid1
        # a server in use is closed when it is released
        client.execute("BEGIN")
        pid3 = client.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("RECONNECT")
        active = [s for s in show(conn, "SERVERS") if s["state"] == "active"]
        assert active[0]["close_needed"] == 1
        client.execute("COMMIT")
        conn.execute("WAIT_CLOSE app")
        assert client.execute("SELECT pg_backend_pid()").fetchone()[0] != pid3


def test_kill_disconnects_clients(proxy: Any) -> None:
    with app(proxy) as victim, admin(proxy) as conn:
        victim.execute("SELECT 1")
        other = psycopg.connect(proxy.dsn(dbname="app2"), autocommit=True)
        assert conn.execute("KILL app").statusmessage == "KILL"
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert other.execute("SELECT 2").fetchone()[0] == 2  # another database is untouched
        other.close()
        assert pool_row(conn)["sv_idle"] == 0
        conn.execute("RESUME app")
        with app(proxy) as again:
            assert again.execute("SELECT 3").fetchone()[0] == 3


def test_kill_client(proxy: Any) -> None:
    with app(proxy) as victim, admin(proxy) as conn:
        victim.execute("SELECT 1")
        (row,) = [c for c in show(conn, "CLIENTS") if c["database"] == "app"]
        assert conn.execute(f"KILL_CLIENT {row['id']}").statusmessage == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        with pytest.raises(errors.Error, match="client not found"):
            conn.execute(f"KILL_CLIENT {row['id']}")


def test_set_and_show_config(proxy: Any) -> None:
    with admin(proxy) as conn:
        assert conn.execute("SET default_pool_size = 7").statusmessage == "SET"
        config = {r["key"]: r for r in show(conn, "CONFIG")}
        assert config["default_pool_size"]["value"] == "7"
        assert config["default_pool_size"]["changeable"] == "yes"
        assert config["listen_port"]["changeable"] == "no"
        dbs = {r["name"]: r for r in show(conn, "DATABASES")}
        assert dbs["app2"]["pool_size"] == 7
        conn.execute("SET server_reset_query TO 'DISCARD ALL'")
        conn.execute("set query_wait_timeout=30")
        assert {r["key"]: r["value"] for r in show(conn, "CONFIG")}["query_wait_timeout"] == "30"
        with pytest.raises(errors.InvalidParameterValue, match="default_pool_size"):
            conn.execute("SET default_pool_size = lots")
        with pytest.raises(errors.UndefinedObject, match="no_such_setting"):
            conn.execute("SET no_such_setting = 1")
        with pytest.raises(errors.CantChangeRuntimeParam):
            conn.execute("SET listen_port = 1")
        assert {r["key"]: r["value"] for r in show(conn, "CONFIG")}["default_pool_size"] == "7"


def test_reload_bad_config_keeps_serving(proxy: Any) -> None:
    with admin(proxy) as conn, app(proxy) as client:
        assert conn.execute("RELOAD").statusmessage == "RELOAD"
        good = proxy.config_path.read_text()
        proxy.config_path.write_text(good + "\n[proxy\nbroken = \n")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("RELOAD")
        assert info.value.sqlstate == "F0000"
        assert str(proxy.config_path) in str(info.value) or "tvproxy.toml" in str(info.value)
        assert "\n" not in info.value.diag.message_primary
        assert client.execute("SELECT 5").fetchone()[0] == 5
        with app(proxy) as fresh:
            assert fresh.execute("SELECT 6").fetchone()[0] == 6
        proxy.config_path.write_text(good)
        assert conn.execute("RELOAD").statusmessage == "RELOAD"


def test_suspend_and_shutdown(proxy: Any) -> None:
    with admin(proxy) as conn:
        assert conn.execute("SUSPEND").statusmessage == "SUSPEND"
        state = {r["key"]: r["value"] for r in show(conn, "STATE")}
        assert state["suspended"] == "yes"
        conn.execute("RESUME")
        assert {r["key"]: r["value"] for r in show(conn, "STATE")}["active"] == "yes"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SHUTDOWN")  # no answer: the connection ends with the process
    assert proxy.wait(10) == 0


def test_shutdown_wait_for_clients(proxy: Any) -> None:
    client = app(proxy)
    client.execute("SELECT 1")
    with admin(proxy) as conn:
        assert conn.execute("SHUTDOWN WAIT_FOR_CLIENTS").statusmessage == "SHUTDOWN"
    time.sleep(0.3)
    assert proxy.running  # a client is still connected
    assert client.execute("SELECT 2").fetchone()[0] == 2
    client.close()
    assert proxy.wait(10) == 0


# --- the prometheus exporter, unmodified ------------------------------------------------------

def test_prometheus_pgbouncer_exporter_scrapes(proxy: Any) -> None:
    collector_mod = pytest.importorskip("prometheus_pgbouncer_exporter.collector")
    config_mod = pytest.importorskip("prometheus_pgbouncer_exporter.config")
    from prometheus_client import CollectorRegistry, generate_latest

    with app(proxy) as client:
        client.execute("SELECT 1")
    config = config_mod.PgbouncerConfig(
        {"dsn": proxy.url(dbname="pgbouncer", user="postgres"), "extra_labels": {"i": "t"}}
    )
    metrics = collector_mod.PgbouncerMetricsCollector(config).collect()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for m in metrics:
        by_name.setdefault(m["name"], []).append(m)
    assert by_name["pgbouncer_up"][0]["value"] == 1
    xacts = {m["labels"]["database"]: m["value"] for m in by_name["pgbouncer_stats_transactions_total"]}
    assert xacts["app"] >= 1
    assert "pgbouncer_pools_client_maxwait_seconds" in by_name
    assert "pgbouncer_databases_database_pool_size" in by_name
    assert by_name["pgbouncer_config_max_client_conn"][0]["value"] == 200

    registry = CollectorRegistry()
    registry.register(collector_mod.PgbouncersMetricsCollector([config]))
    text = generate_latest(registry).decode()
    assert 'pgbouncer_up{i="t"} 1.0' in text
    assert 'pgbouncer_stats_queries_total{database="app",i="t"}' in text
