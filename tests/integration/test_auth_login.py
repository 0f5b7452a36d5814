"""Client authentication against an auth_file (plain, md5 and SCRAM secrets) and upstream
authentication with md5 and SCRAM, through a real tvproxy with psycopg, asyncpg and psql.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import subprocess
import time
from typing import Any

import asyncpg
import psycopg
import pytest

PLAIN_USER, PLAIN_PW = "alice", "alice-pw"
MD5_USER, MD5_PW = "bob", "bob-pw"
SCRAM_USER, SCRAM_PW = "scramuser", "scrampass"  # the secret is PostgreSQL's own


def md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


@pytest.fixture(scope="module")
def scram_secret(pg: Any) -> str:
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as c:
        row = c.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                        (SCRAM_USER,)).fetchone()
    assert row is not None and row[0].startswith("SCRAM-SHA-256$"), row
    return str(row[0])


@pytest.fixture(scope="module")
def userlist(scram_secret: str) -> dict[str, str]:
    return {
        PLAIN_USER: PLAIN_PW,
        MD5_USER: md5_secret(MD5_USER, MD5_PW),
        SCRAM_USER: scram_secret,
    }


PASSWORDS = {PLAIN_USER: PLAIN_PW, MD5_USER: MD5_PW, SCRAM_USER: SCRAM_PW}


def auth_request_code(host: str, port: int, user: str) -> int:
    """The Authentication request code the proxy answers a StartupMessage with."""
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0app\0\0"
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        head = b""
        while len(head) < 9:
            chunk = s.recv(9 - len(head))
            assert chunk, "proxy closed the connection"
            head += chunk
    assert head[:1] == b"R", head
    return struct.unpack("!I", head[5:9])[0]


async def login_psycopg(proxy: Any, user: str, password: str, db: str = "app") -> str:
    def go() -> str:
        with psycopg.connect(proxy.dsn(db, user=user, password=password), connect_timeout=5,
                             autocommit=True) as c:
            return str(c.execute("SELECT current_user").fetchone()[0])  # type: ignore[index]

    return await asyncio.to_thread(go)


async def login_asyncpg(proxy: Any, user: str, password: str, db: str = "app") -> str:
    conn = await asyncio.wait_for(asyncpg.connect(proxy.url(db, user=user, password=password)), 5)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


DRIVERS = {"psycopg": login_psycopg, "asyncpg": login_asyncpg}


# --------------------------------------------------------------------------------------------
# client side


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
async def test_login_with_each_secret_kind(pg: Any, proxy_factory: Any, userlist: dict[str, str],
                                           auth_type: str) -> None:
    proxy = proxy_factory(auth={"auth_type": auth_type}, userlist=userlist)
    for user in (PLAIN_USER, MD5_USER, SCRAM_USER):
        for name, login in DRIVERS.items():
            if auth_type == "scram-sha-256" and user == MD5_USER:
                # an md5 secret cannot verify a SCRAM exchange (as PostgreSQL and PgBouncer)
                with pytest.raises((psycopg.OperationalError, asyncpg.PostgresError)) as ei:
                    await login(proxy, user, PASSWORDS[user])
                if name == "asyncpg":
                    assert ei.value.sqlstate == "28P01"  # type: ignore[union-attr]
                continue
            # upstream the database's configured user (trust) is used
            assert await login(proxy, user, PASSWORDS[user]) == pg.user, (user, name)


@pytest.mark.parametrize(
    "auth_type,user,code",
    [
        ("md5", PLAIN_USER, 5),       # AuthenticationMD5Password
        ("md5", MD5_USER, 5),
        ("md5", SCRAM_USER, 10),      # a SCRAM secret can only do SCRAM: AuthenticationSASL
        ("scram-sha-256", PLAIN_USER, 10),
        ("scram-sha-256", SCRAM_USER, 10),
        ("trust", PLAIN_USER, 0),     # AuthenticationOk straight away
    ],
)
def test_method_offered_depends_on_auth_type_and_secret(pg: Any, proxy_factory: Any,
                                                       userlist: dict[str, str], auth_type: str,
                                                       user: str, code: int) -> None:
    proxy = proxy_factory(auth={"auth_type": auth_type}, userlist=userlist)
    assert auth_request_code(proxy.host, proxy.port, user) == code


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
async def test_wrong_password_and_unknown_user_get_28p01(pg: Any, proxy_factory: Any,
                                                         userlist: dict[str, str],
                                                         auth_type: str) -> None:
    proxy = proxy_factory(auth={"auth_type": auth_type}, userlist=userlist)
    cases = [(PLAIN_USER, "nope"), (SCRAM_USER, "nope"), ("mallory", "whatever")]
    if auth_type == "md5":
        cases.append((MD5_USER, "nope"))
    for user, password in cases:
        t0 = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as ei:
            await login_asyncpg(proxy, user, password)
        assert ei.value.sqlstate == "28P01", (user, ei.value)
        assert str(ei.value) == f'password authentication failed for user "{user}"'
        with pytest.raises(psycopg.OperationalError) as pe:
            await login_psycopg(proxy, user, password)
        assert f'password authentication failed for user "{user}"' in str(pe.value)
        assert time.monotonic() - t0 < 3
    # and the right password still works afterwards
    assert await login_asyncpg(proxy, PLAIN_USER, PLAIN_PW) == pg.user


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain"])
async def test_empty_password_is_refused(pg: Any, proxy_factory: Any, userlist: dict[str, str],
                                         auth_type: str) -> None:
    """As PostgreSQL and PgBouncer: an empty password never logs anyone in."""
    proxy = proxy_factory(auth={"auth_type": auth_type}, userlist={**userlist, "empty": ""})
    with pytest.raises(asyncpg.PostgresError) as ei:
        await login_asyncpg(proxy, "empty", "")
    assert ei.value.sqlstate in ("28P01", "28000")


async def test_trust_ignores_password(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(auth={"auth_type": "trust"})
    assert await login_asyncpg(proxy, "anyone", "anything") == pg.user
    assert await login_psycopg(proxy, "anyone", "") == pg.user


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
def test_psql_logs_in(pg: Any, proxy_factory: Any, userlist: dict[str, str],
                      auth_type: str) -> None:
    proxy = proxy_factory(auth={"auth_type": auth_type}, userlist=userlist)
    env = {**os.environ, "PGPASSWORD": PLAIN_PW, "PGCONNECT_TIMEOUT": "5"}
    r = subprocess.run(
        ["psql", "-X", "-At", proxy.dsn(user=PLAIN_USER), "-c", "SELECT 40 + 2"],
        capture_output=True, text=True, env=env, timeout=20, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
    env["PGPASSWORD"] = "wrong"
    r = subprocess.run(
        ["psql", "-X", "-At", proxy.dsn(user=PLAIN_USER), "-c", "SELECT 1"],
        capture_output=True, text=True, env=env, timeout=20, stdin=subprocess.DEVNULL,
    )
    assert r.returncode != 0
    assert "password authentication failed" in r.stderr


async def test_reload_picks_up_new_userlist(pg: Any, proxy_factory: Any,
                                            userlist: dict[str, str]) -> None:
    proxy = proxy_factory(auth={"auth_type": "scram-sha-256"}, userlist=userlist)
    with pytest.raises(asyncpg.PostgresError):
        await login_asyncpg(proxy, "carol", "carol-pw")
    proxy.reload(userlist={**userlist, "carol": "carol-pw"})
    deadline = time.monotonic() + 5
    while True:
        try:
            assert await login_asyncpg(proxy, "carol", "carol-pw") == pg.user
            break
        except asyncpg.PostgresError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------------------------
# upstream


def upstream_db(pg: Any, user: str | None, password: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"host": pg.host, "port": pg.port, "dbname": "app"}
    if user is not None:
        d["user"] = user
    if password is not None:
        d["password"] = password
    return d


@pytest.mark.parametrize("user,password", [("md5user", "md5pass"), ("scramuser", "scrampass")])
async def test_upstream_md5_and_scram(pg: Any, proxy_factory: Any, user: str,
                                      password: str) -> None:
    proxy = proxy_factory(databases={"up": upstream_db(pg, user, password)},
                          proxy={"default_pool_size": 2})
    assert await login_asyncpg(proxy, "client", "", db="up") == user
    with psycopg.connect(proxy.dsn("up", user="client"), autocommit=True) as c:
        assert c.execute("SELECT current_user, current_database()").fetchone() == (user, "app")
        # a new server login (more than one backend) works too
        with psycopg.connect(proxy.dsn("up", user="client2"), autocommit=True) as c2:
            c.execute("BEGIN")
            c.execute("SELECT 1")
            assert c2.execute("SELECT current_user").fetchone() == (user,)
            c.execute("COMMIT")
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as m:
        n = m.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                      " AND datname = 'app' AND application_name NOT LIKE 'tvproxy-listener %%'",
                      (user,)).fetchone()[0]  # type: ignore[index]
        assert n == 2


@pytest.mark.parametrize("user", ["md5user", "scramuser"])
async def test_upstream_wrong_password_is_an_error_not_a_hang(pg: Any, proxy_factory: Any,
                                                              user: str) -> None:
    proxy = proxy_factory(databases={"up": upstream_db(pg, user, "wrong-password")})
    for _ in range(2):  # the first login and the fail-fast retry
        t0 = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as ei:
            await asyncio.wait_for(asyncpg.connect(proxy.url("up", user="client")), 10)
        assert time.monotonic() - t0 < 3
        assert ei.value.sqlstate in ("28P01", "08006"), ei.value
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn("up", user="client"), connect_timeout=10)
    # other databases are fine
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


async def test_upstream_missing_password_is_an_error(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(databases={"up": upstream_db(pg, "md5user", None)})
    with pytest.raises(asyncpg.PostgresError) as ei:
        await asyncio.wait_for(asyncpg.connect(proxy.url("up", user="client")), 10)
    assert ei.value.sqlstate in ("28P01", "08006"), ei.value


@pytest.mark.parametrize("user,password", [("md5user", "md5pass"), ("scramuser", "scrampass")])
async def test_client_user_and_password_used_upstream(pg: Any, proxy_factory: Any, user: str,
                                                      password: str) -> None:
    """No user in [databases]: log in upstream as the client, with its auth_file password."""
    proxy = proxy_factory(
        auth={"auth_type": "scram-sha-256"},
        userlist={"md5user": "md5pass", "scramuser": "scrampass"},
        databases={"passthru": upstream_db(pg, None, None)},
    )
    assert await login_asyncpg(proxy, user, password, db="passthru") == user
    with psycopg.connect(proxy.dsn("passthru", user=user, password=password),
                         autocommit=True) as c:
        assert c.execute("SELECT session_user").fetchone() == (user,)
