"""The 23 TVIEW scenarios of shared/scenarios/tviews.md, one test each, through the proxy on
every PostgreSQL version at hand (``tview_pg``) and with three drivers:

- ``psycopg-simple``: psycopg 3, client-side binding (``ClientCursor``): every statement is a
  simple Query;
- ``psycopg-ext``: psycopg 3 server-side binding: every statement, transaction control
  included, is Parse/Bind/Execute/Sync on the unnamed statement (``prepare=False``; a statement
  without parameters asks for binary results, which psycopg can only get that way);
- ``asyncpg``: named prepared statements (Parse/Describe, then Bind/Execute; cached per
  connection by SQL text, as asyncpg's own statement cache does), transaction
  control as asyncpg sends it (simple Query).

After every COMMIT the oracle holds (every tv_x equals v_x, both ways, over the view's
columns).  R(e, pk), the refreshes of row pk of tv_e, is measured two ways around each
transaction (:func:`refresh`): rows of every tv_ table are stamped beforehand straight on the
server and a refresh of a row drops the stamp, which gives the exact set of refreshed keys; and
``SHOW TVIEW STATS`` deltas give refresh statements and key counts per TVIEW.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest
import tview_fixture
from harness import ProxyProcess, wait_until
from tview_fixture import FIXTURE, TVIEWS, FixtureF, refresh_events, wait_for_stats

tvf = tview_fixture.tvf
tvf_base = tview_fixture.tvf_base
tview_proxy = tview_fixture.tview_proxy

DRIVERS = ("psycopg-simple", "psycopg-ext", "asyncpg")
pytestmark = pytest.mark.parametrize("db", DRIVERS, indirect=True)

ALL = "all"  # in ``never``: no key of that TVIEW is refreshed
COUNTERS = ("commits", "keys_enqueued", "rows_refreshed", "rows_deleted", "refresh_statements",
            "errors")
UUID_OID = 2950


# --------------------------------------------------------------------------------------------
# Drivers


@dataclass
class Result:
    tag: str
    rowcount: int
    columns: list[tuple[str, int]]  # (name, type oid) of the result, [] when there is none
    rows: list[tuple[Any, ...]]


def _pyformat(sql: str) -> str:
    """``$n`` placeholders as psycopg's ``%(pn)s`` (literal % doubled)."""
    return re.sub(r"\$(\d+)", r"%(p\1)s", sql.replace("%", "%%"))


def _named(params: Iterable[Any]) -> dict[str, Any]:
    return {f"p{i}": v for i, v in enumerate(params, 1)}


def _count(tag: str) -> int:
    last = tag.rsplit(" ", 1)[-1] if tag else ""
    return int(last) if last.isdigit() else -1


class Driver:
    """One client connection.  SQL is written with ``$n`` placeholders.

    ``execute``: one statement in the driver's protocol form; ``control``: transaction control
    (BEGIN, COMMIT, SAVEPOINT, PREPARE TRANSACTION, ...) the way the driver sends it; ``script``:
    a simple Query (several statements allowed); ``batch``: one statement for each parameter
    row, all before one Sync.
    """

    name: str

    async def execute(self, sql: str, *params: Any) -> Result:
        raise NotImplementedError

    async def control(self, sql: str) -> Result:
        raise NotImplementedError

    async def script(self, sql: str) -> Result:
        raise NotImplementedError

    async def batch(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def in_transaction(self) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def value(self, sql: str, *params: Any) -> Any:
        rows = (await self.execute(sql, *params)).rows
        return rows[0][0] if rows else None


class PsycopgDriver(Driver):
    def __init__(self, conn: psycopg.AsyncConnection[Any], extended: bool) -> None:
        self.conn = conn
        self.extended = extended
        self.name = "psycopg-ext" if extended else "psycopg-simple"

    @classmethod
    async def connect(cls, dsn: str, extended: bool) -> PsycopgDriver:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     prepare_threshold=None)
        return cls(conn, extended)

    def _cursor(self) -> Any:
        return self.conn.cursor() if self.extended else psycopg.AsyncClientCursor(self.conn)

    @staticmethod
    async def _result(cur: Any) -> Result:
        desc = cur.description
        rows = [tuple(r) for r in await cur.fetchall()] if desc else []
        cols = [(d.name, d.type_code) for d in desc] if desc else []
        return Result(cur.statusmessage or "", cur.rowcount, cols, rows)

    async def execute(self, sql: str, *params: Any) -> Result:
        cur = self._cursor()
        if self.extended:
            if params:
                await cur.execute(_pyformat(sql), _named(params), prepare=False)
            else:  # binary results: psycopg uses Parse/Bind/Execute even without parameters
                await cur.execute(sql, prepare=False, binary=True)
        elif params:
            await cur.execute(_pyformat(sql), _named(params))
        else:
            await cur.execute(sql)
        return await self._result(cur)

    async def control(self, sql: str) -> Result:
        return await self.execute(sql)

    async def script(self, sql: str) -> Result:
        cur = self.conn.cursor()
        await cur.execute(sql)  # no parameters: a simple Query
        while cur.nextset():
            pass
        return await self._result(cur)

    async def batch(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        cur = self._cursor()
        async with self.conn.pipeline():  # one Sync when the block ends
            for row in rows:
                await cur.execute(_pyformat(sql), _named(row))

    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    async def close(self) -> None:
        await self.conn.close()


class AsyncpgDriver(Driver):
    name = "asyncpg"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._stmts: dict[str, Any] = {}

    @classmethod
    async def connect(cls, url: str) -> AsyncpgDriver:
        return cls(await asyncpg.connect(url))

    async def execute(self, sql: str, *params: Any) -> Result:
        stmt = self._stmts.get(sql)
        if stmt is None:
            stmt = self._stmts[sql] = await self.conn.prepare(sql)
        rows = await stmt.fetch(*params)
        tag = stmt.get_statusmsg() or ""
        cols = [(a.name, a.type.oid) for a in stmt.get_attributes()]
        return Result(tag, _count(tag), cols, [tuple(r.values()) for r in rows])

    async def control(self, sql: str) -> Result:
        tag = await self.conn.execute(sql)  # what asyncpg's Transaction sends
        return Result(tag, _count(tag), [], [])

    async def script(self, sql: str) -> Result:
        tag = await self.conn.execute(sql)
        return Result(tag, _count(tag), [], [])

    async def batch(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self.conn.executemany(sql, rows)  # Bind/Execute per row, one Sync

    def in_transaction(self) -> bool:
        return self.conn.is_in_transaction()

    async def close(self) -> None:
        await self.conn.close()


class Opener:
    """``await db.open(target)``: a connection of this driver kind to ``target`` (a proxy, or
    a server for a direct connection); all are closed at teardown."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.opened: list[Driver] = []

    async def open(self, target: Any, dbname: str = "app") -> Driver:
        d: Driver
        if self.kind == "asyncpg":
            d = await AsyncpgDriver.connect(target.url(dbname))
        else:
            d = await PsycopgDriver.connect(target.dsn(dbname), self.kind == "psycopg-ext")
        self.opened.append(d)
        return d

    async def close_all(self) -> None:
        for d in self.opened:
            try:
                await d.close()
            except Exception:  # noqa: BLE001 - a connection a test broke on purpose
                pass


@pytest.fixture
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Opener]:
    opener = Opener(request.param)
    yield opener
    await opener.close_all()


@asynccontextmanager
async def raises(sqlstate: str) -> AsyncIterator[dict[str, Any]]:
    """The block fails with ``sqlstate`` (either driver's error class)."""
    box: dict[str, Any] = {}
    try:
        yield box
    except (psycopg.Error, asyncpg.PostgresError) as exc:
        box["error"] = exc
        assert getattr(exc, "sqlstate", None) == sqlstate, f"{type(exc).__name__}: {exc}"
    else:
        raise AssertionError(f"expected SQLSTATE {sqlstate}, the statement succeeded")


# --------------------------------------------------------------------------------------------
# Refresh accounting around one transaction


@dataclass
class Outcome:
    refreshed: dict[str, set[Any]] = field(default_factory=dict)
    delta: dict[str, dict[str, int]] = field(default_factory=dict)  # entity ("*": totals)
    events: list[dict[str, Any]] = field(default_factory=list)


def _by_entity(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {(k[3:] if k.startswith("tv_") else k): v for k, v in stats.items()}


def _delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
           ) -> dict[str, dict[str, int]]:
    b, a = _by_entity(before), _by_entity(after)
    zero = dict.fromkeys(COUNTERS, 0)
    return {e: {c: a[e][c] - b.get(e, zero)[c] for c in COUNTERS} for e in a}


@asynccontextmanager
async def refresh(
    fx: FixtureF,
    *,
    must: dict[str, set[Any]] | None = None,
    never: dict[str, set[Any] | str] | None = None,
    keys: dict[str, int] | None = None,
    commits: int | None = 1,
    errors: int = 0,
    statements: int | None = 1,
    proxy: ProxyProcess | None = None,
) -> AsyncIterator[Outcome]:
    """Check what the transaction(s) in the block refreshed, then the oracle.

    ``must``/``never``: keys per entity that are / are not refreshed (``ALL``: none of that
    TVIEW); ``keys``: exact keys_enqueued deltas; ``commits``/``errors``: deltas of the
    database's committed plans / failed refreshes (None: at least one commit, not checked);
    ``statements``: refresh statements of every TVIEW that refreshed a key (0 for the others),
    None to leave them unchecked (read-your-writes flushes add some).
    """
    proxy = proxy or fx.proxy
    fx.stamp()
    before = fx.stats(proxy)
    mark = len(proxy.logs())
    out = Outcome()
    yield out
    want = 1 if commits is None else commits

    def settled(s: dict[str, dict[str, Any]]) -> bool:
        d = _delta(before, s).get("*", dict.fromkeys(COUNTERS, 0))
        return d["commits"] >= want and d["errors"] >= errors

    after = wait_for_stats(fx, settled, proxy)
    out.refreshed = fx.unstamp()
    out.delta = _delta(before, after)
    out.events = refresh_events(proxy, mark)
    fx.oracle()

    total = out.delta.get("*", dict.fromkeys(COUNTERS, 0))
    info = f"refreshed={out.refreshed} stats delta={out.delta}"
    if commits is not None:
        assert total["commits"] == commits, f"committed plans: {info}"
    assert total["errors"] == errors, f"refresh errors: {info}"
    tv_deltas = {e: d for e, d in out.delta.items() if e != "*"}
    assert total["refresh_statements"] == sum(d["refresh_statements"] for d in tv_deltas.values())
    for e, d in tv_deltas.items():
        got = out.refreshed.get(e, set())
        assert d["keys_enqueued"] >= len(got), f"tv_{e} refreshed more rows than keys: {info}"
        if statements is not None:
            n = statements if d["keys_enqueued"] or got else 0
            assert d["refresh_statements"] == n, f"tv_{e} refresh statements: {info}"
    for e, pks in (must or {}).items():
        missing = pks - out.refreshed.get(e, set())
        assert not missing, f"tv_{e} rows {sorted(missing)} not refreshed: {info}"
    for e, pks in (never or {}).items():
        got = out.refreshed.get(e, set())
        if pks == ALL:
            assert not got, f"tv_{e} rows {sorted(got)} refreshed: {info}"
            assert out.delta.get(e, {}).get("keys_enqueued", 0) == 0, f"tv_{e} keys: {info}"
        else:
            both = got & set(pks)
            assert not both, f"tv_{e} rows {sorted(both)} refreshed: {info}"
    for e, n in (keys or {}).items():
        assert out.delta.get(e, {}).get("keys_enqueued", 0) == n, f"tv_{e} keys: {info}"


def data(fx: FixtureF, entity: str, pk: int) -> Any:
    return fx.one(f"SELECT data FROM tv_{entity} WHERE pk_{entity} = %s", pk)


def comment_ids(fx: FixtureF, post: int) -> list[int]:
    return [c["id"] for c in data(fx, "post", post)["comments"]]


NO_UP = {"user": ALL, "company": ALL}  # writes below tb_user never refresh user or company


# --------------------------------------------------------------------------------------------
# The drivers use the protocol they claim


async def test_driver_protocol_forms(tview_pg: Any, db: Opener) -> None:
    c = await db.open(tview_pg)
    multi = "SELECT $1::int; SELECT 2"
    if db.kind == "psycopg-simple":
        await c.execute(multi, 1)  # client-side binding: a simple Query may hold two statements
        await c.execute("SELECT 1; SELECT 2")
    else:  # Parse refuses two statements
        async with raises("42601"):
            await c.execute(multi, 1)
        async with raises("42601"):
            await c.execute("SELECT 1; SELECT 2")
    await c.script("SELECT 1; SELECT 2")


# --------------------------------------------------------------------------------------------
# Scenarios


async def test_s01_create(tvf_base: FixtureF, db: Opener) -> None:
    fx = tvf_base
    c = await db.open(fx.proxy)
    for ddl, rows in zip(TVIEWS, (2, 3, 3), strict=True):
        r = await c.script(ddl)
        assert r.tag == f"SELECT {rows}"  # what CREATE TABLE AS says
    with fx.connect() as pg:
        def cols(rel: str) -> list[tuple[str, str]]:
            return pg.execute("SELECT attname::text, format_type(atttypid, atttypmod) FROM "
                              "pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT "
                              "attisdropped ORDER BY attnum", (rel,)).fetchall()

        def indexes(rel: str) -> set[tuple[str, bool, tuple[str, ...]]]:
            rows = pg.execute(
                "SELECT am.amname::text, i.indisprimary, array_agg(a.attname::text ORDER BY k.n)"
                " FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid"
                " JOIN pg_am am ON am.oid = ic.relam"
                " CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
                " WHERE i.indrelid = %s::regclass GROUP BY ic.oid, am.amname, i.indisprimary",
                (rel,)).fetchall()
            return {(am, primary, tuple(names)) for am, primary, names in rows}

        kinds = dict(pg.execute(
            "SELECT relname::text, relkind::text FROM pg_class WHERE relnamespace = "
            "'public'::regnamespace AND relkind IN ('r', 'v') AND relname ~ '^t?v_'").fetchall())
        assert kinds == {"v_company": "v", "tv_company": "r", "v_user": "v", "tv_user": "r",
                         "v_post": "v", "tv_post": "r"}
        assert cols("tv_post") == cols("v_post") == [
            ("pk_post", "bigint"), ("id", "uuid"), ("fk_user", "bigint"), ("user_id", "uuid"),
            ("data", "jsonb")]
        assert cols("tv_user") == cols("v_user")
        assert cols("tv_company") == cols("v_company")
        for e, fks in {"company": (), "user": ("fk_company",), "post": ("fk_user",)}.items():
            assert indexes(f"tv_{e}") == {("btree", True, (f"pk_{e}",)), ("gin", False, ("data",)),
                                          *{("btree", False, (fk,)) for fk in fks}}, e
        assert pg.execute("SELECT count(*) FROM tv_post").fetchone()[0] == 3
        assert pg.execute("SELECT array_agg(entity::text ORDER BY entity) FROM tvproxy.tview"
                          ).fetchone()[0] == ["company", "post", "user"]
    post1 = data(fx, "post", 1)
    assert post1["author"]["company"]["name"] == "Acme"
    assert comment_ids(fx, 1) == [1, 2]
    fx.oracle()

    r = await c.execute("CREATE TABLE foo AS SELECT 1")
    assert r.tag == "SELECT 1"
    assert fx.one("SELECT relkind::text FROM pg_class WHERE oid = 'foo'::regclass") == "r"
    assert fx.one("SELECT to_regclass('v_foo') IS NULL") is True
    assert fx.one("SELECT count(*) FROM pg_index WHERE indrelid = 'foo'::regclass") == 0
    assert fx.one("SELECT count(*) FROM tvproxy.tview") == 3
    fx.oracle()


async def test_s02_scalar_update(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {1}}, never={"post": {2, 3}, **NO_UP},
                       keys={"post": 1, "user": 0, "company": 0}):
        await c.control("BEGIN")
        r = await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "P1b", 1)
        assert (r.tag, r.rowcount, r.columns) == ("UPDATE 1", 1, [])
        await c.control("COMMIT")
    assert data(tvf, "post", 1)["title"] == "P1b"


async def test_s03_insert(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {4}}, never=NO_UP):
        await c.control("BEGIN")
        r = await c.execute("INSERT INTO tb_post VALUES ($1, DEFAULT, $2, $3)", 4, 3, "P4")
        assert r.tag == "INSERT 0 1"
        await c.control("COMMIT")
    row = tvf.one("SELECT row(fk_user, user_id = (SELECT id FROM tb_user WHERE pk_user = 3), "
                  "data->'author'->>'name', data->'author'->'company'->>'name', data->>'title')"
                  "::text FROM tv_post WHERE pk_post = 4")
    assert row == "(3,t,Carol,Globex,P4)"


async def test_s04_delete(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {3}}, never=NO_UP):
        await c.control("BEGIN")
        assert (await c.execute("DELETE FROM tb_comment WHERE fk_post = $1", 3)).tag == "DELETE 0"
        assert (await c.execute("DELETE FROM tb_post WHERE pk_post = $1", 3)).tag == "DELETE 1"
        await c.control("COMMIT")
    assert tvf.one("SELECT count(*) FROM tv_post WHERE pk_post = 3") == 0
    assert tvf.one("SELECT count(*) FROM tv_post") == 2


async def test_s05_one_level_cascade(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"user": {1}, "post": {1, 2}},
                       never={"post": {3}, "company": ALL}, keys={"post": 2}):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "Alicia", 1)
        await c.control("COMMIT")
    assert data(tvf, "user", 1)["name"] == "Alicia"
    assert [data(tvf, "post", p)["author"]["name"] for p in (1, 2, 3)] == ["Alicia", "Alicia",
                                                                          "Bob"]


async def test_s06_two_level_cascade(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"company": {1}, "user": {1, 2}, "post": {1, 2, 3}},
                       never={"user": {3}}, keys={"user": 2, "post": 3}):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_company SET name = $1 WHERE pk_company = $2", "Acme Corp", 1)
        await c.control("COMMIT")
    assert data(tvf, "company", 1)["name"] == "Acme Corp"
    assert [data(tvf, "user", u)["company"]["name"] for u in (1, 2, 3)] == [
        "Acme Corp", "Acme Corp", "Globex"]
    assert {data(tvf, "post", p)["author"]["company"]["name"] for p in (1, 2, 3)} == {"Acme Corp"}


async def test_s07_no_upward_cascade(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {1}}, never=NO_UP, keys={"user": 0, "company": 0}):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "x", 1)
        await c.control("COMMIT")
    assert data(tvf, "post", 1)["title"] == "x"


async def test_s08_row_moves_parent(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {1}}, never=NO_UP):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_post SET fk_user = $1 WHERE pk_post = $2", 3, 1)
        await c.control("COMMIT")
    row = tvf.one("SELECT row(fk_user, user_id = (SELECT id FROM tb_user WHERE pk_user = 3), "
                  "data->'author'->>'name', data->'author'->'company'->>'name')::text "
                  "FROM tv_post WHERE pk_post = 1")
    assert row == "(3,t,Carol,Globex)"


async def test_s09_child_insert_into_aggregate(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {1}}, never={"post": {2}, **NO_UP}):
        await c.control("BEGIN")
        await c.execute("INSERT INTO tb_comment VALUES ($1, DEFAULT, $2, $3)", 3, 1, "c3")
        await c.control("COMMIT")
    assert comment_ids(tvf, 1) == [1, 2, 3]


async def test_s10_child_update(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {1}}, never=NO_UP):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_comment SET text = $1 WHERE pk_comment = $2", "c1b", 1)
        await c.control("COMMIT")
    assert [x["text"] for x in data(tvf, "post", 1)["comments"]] == ["c1b", "c2"]


async def test_s11_child_delete(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    for pk, left in ((1, [2]), (2, [])):
        async with refresh(tvf, must={"post": {1}}, never={"post": {2, 3}, **NO_UP},
                           keys={"post": 1}):
            await c.control("BEGIN")
            r = await c.execute("DELETE FROM tb_comment WHERE pk_comment = $1", pk)
            assert r.tag == "DELETE 1"
            await c.control("COMMIT")
        assert comment_ids(tvf, 1) == left
    assert data(tvf, "post", 1)["comments"] == []


async def test_s12_child_moves_parent(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": {1, 2}}, never={"post": {3}, **NO_UP}):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_comment SET fk_post = $1 WHERE pk_comment = $2", 2, 1)
        await c.control("COMMIT")
    assert comment_ids(tvf, 1) == [2]
    assert comment_ids(tvf, 2) == [1]


async def test_s13_coalescing(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"user": {1}, "post": {1, 2}},
                       keys={"user": 1, "post": 2, "company": 0}) as out:
        await c.control("BEGIN")
        for i in range(10):
            await c.execute("UPDATE tb_user SET email = $1 WHERE pk_user = $2", f"e{i}@x", 1)
        await c.control("COMMIT")
    assert out.delta["user"]["refresh_statements"] == 1
    assert out.delta["post"]["refresh_statements"] == 1
    assert tvf.one("SELECT email FROM tb_user WHERE pk_user = 1") == "e9@x"


async def test_s14_coalescing_across_cascade(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"user": {1}, "post": {1, 2}}, never={"company": ALL}) as out:
        await c.control("BEGIN")
        await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "A2", 1)
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "T", 1)
        await c.control("COMMIT")
    assert out.delta["post"]["refresh_statements"] == 1  # R(post,1) = 1
    post1 = data(tvf, "post", 1)
    assert (post1["title"], post1["author"]["name"]) == ("T", "A2")


async def test_s15_order(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    mark = len(tvf.proxy.logs())
    async with refresh(tvf, must={"company": {1}, "user": {1, 2}, "post": {1, 2, 3}}) as out:
        await c.control("BEGIN")
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "T1", 1)
        await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "U1", 1)
        await c.execute("UPDATE tb_company SET name = $1 WHERE pk_company = $2", "C1", 1)
        await c.control("COMMIT")
    assert wait_until(lambda: refresh_events(tvf.proxy, mark), 2.0)
    events = refresh_events(tvf.proxy, mark)
    assert [e["entities"] for e in events] == [["company", "user", "post"]], events
    assert events[0]["keys"] == [1, 2, 3]  # each key once
    assert all(out.delta[e]["refresh_statements"] == 1 for e in ("company", "user", "post"))
    post1 = data(tvf, "post", 1)
    assert (post1["title"], post1["author"]["name"], post1["author"]["company"]["name"]) == (
        "T1", "U1", "C1")


async def test_s16_read_your_writes(tvf: FixtureF, tview_proxy_factory: Any, db: Opener) -> None:
    read = "SELECT data->>'name' FROM tv_user WHERE pk_user = $1"
    write = "UPDATE tb_user SET name = $1 WHERE pk_user = $2"

    off = tview_proxy_factory(tview={"read_your_writes": False})
    c_off = await db.open(off)
    async with refresh(tvf, proxy=off, must={"user": {1}, "post": {1, 2}}):
        await c_off.control("BEGIN")
        await c_off.execute(write, "Z", 1)
        assert await c_off.value(read, 1) == "Alice"  # off: the refresh waits for COMMIT
        await c_off.control("COMMIT")
    assert await c_off.value(read, 1) == "Z"

    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"user": {1}}):
        await c.execute(write, "Alice", 1)
    async with refresh(tvf, must={"user": {1}, "post": {1, 2}}, statements=None):
        await c.control("BEGIN")
        await c.execute(write, "Z", 1)
        assert await c.value(read, 1) == "Z", "read-your-writes (default on): no flush"
        await c.control("COMMIT")
    assert await c.value(read, 1) == "Z"

    # a later write to the same key after a flush still ends in a correct row at COMMIT
    async with refresh(tvf, must={"user": {1}, "post": {1, 2}}, statements=None):
        await c.control("BEGIN")
        await c.execute(write, "Y", 1)
        # the read reuses the statement prepared in the transaction before (asyncpg: Bind only)
        assert await c.value(read, 1) == "Y", "read-your-writes: tv_user not flushed before a read"
        await c.execute(write, "Z2", 1)
        assert await c.value("SELECT data->'author'->>'name' FROM tv_post WHERE pk_post = $1",
                             1) == "Z2"
        await c.execute(write, "Z3", 1)
        await c.control("COMMIT")
    assert data(tvf, "user", 1)["name"] == "Z3"
    assert [data(tvf, "post", p)["author"]["name"] for p in (1, 2)] == ["Z3", "Z3"]


async def test_s17_rollback(tvf: FixtureF, tview_proxy_factory: Any, db: Opener) -> None:
    one = tview_proxy_factory(proxy={"default_pool_size": 1})  # every client on one server
    a = await db.open(one)
    b = await db.open(one)
    pid = "SELECT pg_backend_pid()"
    nothing = {"company": ALL, "user": ALL, "post": ALL}

    async with refresh(tvf, proxy=one, commits=0, never=nothing):
        await a.control("BEGIN")
        await a.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "R", 1)
        await a.control("ROLLBACK")
    assert data(tvf, "user", 1)["name"] == "Alice"

    # the same client's next transaction: only its own keys (post 3, not user 1 -> posts 1, 2)
    async with refresh(tvf, proxy=one, must={"post": {3}}, never={"post": {1, 2}, **NO_UP},
                       keys={"post": 1}):
        await a.control("BEGIN")
        await a.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "n3", 3)
        await a.control("COMMIT")

    # another client on the same server after a rollback, and after a client that left
    # mid-transaction
    await a.control("BEGIN")
    await a.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "R2", 1)
    pid_a = await a.value(pid)
    await a.control("ROLLBACK")
    async with refresh(tvf, proxy=one, must={"post": {3}}, never={"post": {1, 2}, **NO_UP}):
        await b.control("BEGIN")
        assert await b.value(pid) == pid_a
        await b.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "m3", 3)
        await b.control("COMMIT")
    await a.control("BEGIN")
    await a.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "R3", 1)
    await a.close()
    async with refresh(tvf, proxy=one, must={"post": {3}}, never={"post": {1, 2}, **NO_UP}):
        await b.control("BEGIN")
        assert await b.value(pid) == pid_a
        await b.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "k3", 3)
        await b.control("COMMIT")
    assert data(tvf, "user", 1)["name"] == "Alice"
    assert data(tvf, "post", 3)["title"] == "k3"


async def test_s18_rollback_to_savepoint(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"user": {1}, "post": {1, 2}}, never={"post": {3}},
                       keys={"post": 2}):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "S", 1)
        await c.control("SAVEPOINT s")
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "gone", 3)
        await c.control("ROLLBACK TO s")
        await c.control("COMMIT")
    assert data(tvf, "user", 1)["name"] == "S"
    assert data(tvf, "post", 3)["title"] == "P3"


async def test_s19_release_savepoint(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"user": {1}, "post": {1, 2, 3}}):
        await c.control("BEGIN")
        await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "S", 1)
        await c.control("SAVEPOINT s")
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "gone", 3)
        await c.control("RELEASE s")
        await c.control("COMMIT")
    assert data(tvf, "user", 1)["name"] == "S"
    assert data(tvf, "post", 3)["title"] == "gone"


async def test_s20_refresh_failure_fails_commit(tvf: FixtureF, db: Opener) -> None:
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=True) as setup:
        setup.execute("CREATE TABLE tb_div (pk_div BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT "
                      "gen_random_uuid(), v INT NOT NULL); INSERT INTO tb_div VALUES (1, DEFAULT, 1)")
        setup.execute("CREATE TABLE tv_div AS SELECT pk_div, id, jsonb_build_object('x', 1/v) "
                      "AS data FROM tb_div")
    nothing = {"company": ALL, "user": ALL, "post": ALL, "div": ALL}
    insert = "INSERT INTO tb_div VALUES ($1, DEFAULT, $2)"
    c = await db.open(tvf.proxy)

    async with refresh(tvf, commits=0, errors=1, never=nothing):
        await c.control("BEGIN")
        await c.execute(insert, 2, 0)
        async with raises("22012"):
            await c.control("COMMIT")
    assert tvf.one("SELECT count(*) FROM tb_div WHERE pk_div = 2") == 0
    assert not c.in_transaction()
    assert await c.value("SELECT $1::int + 1", 1) == 2  # the connection is usable

    # the same without BEGIN
    async with refresh(tvf, commits=0, errors=1, never=nothing), raises("22012"):
        await c.execute(insert, 3, 0)
    assert tvf.one("SELECT count(*) FROM tb_div WHERE pk_div = 3") == 0
    assert not c.in_transaction()

    async with refresh(tvf, must={"div": {4}}):
        await c.control("BEGIN")
        await c.execute(insert, 4, 5)
        await c.control("COMMIT")
    assert data(tvf, "div", 4) == {"x": 0}
    assert tvf.drift()["div"] == 0


async def test_s21_two_phase_commit(tvf: FixtureF, db: Opener) -> None:
    gid = f"g1_{uuid.uuid4().hex[:12]}"
    a = await db.open(tvf.proxy)
    b = await db.open(tvf.proxy)
    reads = {
        "tb_user": ("SELECT name FROM tb_user WHERE pk_user = $1", 2),
        "tv_user": ("SELECT data->>'name' FROM tv_user WHERE pk_user = $1", 2),
        "tv_post": ("SELECT data->'author'->>'name' FROM tv_post WHERE pk_post = $1", 3),
    }
    async with refresh(tvf, must={"user": {2}, "post": {3}},
                       never={"user": {1, 3}, "post": {1, 2}, "company": ALL},
                       commits=None, statements=None):
        await a.control("BEGIN")
        await a.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "2pc", 2)
        await a.control(f"PREPARE TRANSACTION '{gid}'")
        assert not a.in_transaction()
        assert tvf.one("SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", gid) == 1
        for what, (sql, pk) in reads.items():  # nobody sees the prepared change
            assert await b.value(sql, pk) == "Bob", what
            assert tvf.one(sql.replace("$1", "%s"), pk) == "Bob", what
        await b.control(f"COMMIT PREPARED '{gid}'")
    for what, (sql, pk) in reads.items():
        assert await a.value(sql, pk) == "2pc", what
    assert tvf.one("SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", gid) == 0
    assert tvf.one("SELECT count(*) FROM tvproxy.pending_refresh") == 0
    assert await b.value("SELECT count(*) FROM tvproxy.pending_refresh") == 0


async def test_s22_autocommit(tvf: FixtureF, db: Opener) -> None:
    c = await db.open(tvf.proxy)
    title = "SELECT title FROM tb_post WHERE pk_post = %s"

    # one statement outside a transaction block (a simple Query, or Parse/Bind/Execute/Sync)
    async with refresh(tvf, must={"post": {2}}, never={"post": {1, 3}, **NO_UP}):
        r = await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "auto", 2)
        assert r.tag == "UPDATE 1"
        assert not c.in_transaction()
        # committed with its refresh by the time the client has the answer
        assert data(tvf, "post", 2)["title"] == "auto"

    # a multi-statement simple Query is one implicit transaction: one refresh per TVIEW
    async with refresh(tvf, must={"post": {1}, "user": {3}}, never={"company": ALL}):
        await c.script("UPDATE tb_post SET title = 'm1' WHERE pk_post = 1; "
                       "UPDATE tb_user SET name = 'm3' WHERE pk_user = 3")
        assert not c.in_transaction()
    assert (data(tvf, "post", 1)["title"], data(tvf, "user", 3)["name"]) == ("m1", "m3")

    # ... and fails as one, refresh included
    async with refresh(tvf, commits=0, never={"post": ALL, **NO_UP}):
        async with raises("22012"):
            await c.script("UPDATE tb_post SET title = 'lost' WHERE pk_post = 2; SELECT 1/0")
        assert not c.in_transaction()
    assert tvf.one(title, 2) == "auto"

    # several extended-protocol statements before one Sync: one implicit transaction too
    batch = "UPDATE tb_post SET title = $1 WHERE pk_post = $2 AND 1 / $3 = 1"
    async with refresh(tvf, must={"post": {1, 3}}, never={"post": {2}, **NO_UP}):
        await c.batch(batch, [("b1", 1, 1), ("b3", 3, 1)])
        assert not c.in_transaction()
    assert (tvf.one(title, 1), tvf.one(title, 3)) == ("b1", "b3")
    async with refresh(tvf, commits=0, never={"post": ALL, **NO_UP}):
        async with raises("22012"):
            await c.batch(batch, [("lost", 1, 1), ("lost", 3, 0)])
        assert not c.in_transaction()
    assert (tvf.one(title, 1), tvf.one(title, 3)) == ("b1", "b3")


def _comparable(r: Result) -> tuple[Any, ...]:
    """A result without what differs between two fresh copies of F (random uuids)."""
    keep = [i for i, (_, oid) in enumerate(r.columns) if oid != UUID_OID]
    rows = sorted((tuple(row[i] for i in keep) for row in r.rows), key=repr)
    return r.tag, r.rowcount, r.columns, rows


async def test_s23_unnamed_keys(tvf: FixtureF, db: Opener) -> None:
    # the same statements straight on PostgreSQL, on a fresh copy of F in app2
    with psycopg.connect(tvf.pg.dsn("app2"), autocommit=True) as mirror:
        mirror.execute(FIXTURE)
    c = await db.open(tvf.proxy)
    direct = await db.open(tvf.pg, "app2")
    statements: list[tuple[bool, str, tuple[Any, ...], dict[str, set[Any]]]] = [
        (False, "UPDATE tb_post SET title = title || '!' WHERE title LIKE $1", ("P%",),
         {"post": {1, 2, 3}}),
        (False, "INSERT INTO tb_post SELECT $1 + pk_post, gen_random_uuid(), fk_user, title "
                "FROM tb_post", (10,), {"post": {11, 12, 13}}),
        (True, "UPDATE tb_post SET title = title || '?' WHERE title LIKE $1 "
               "RETURNING pk_post, title", ("P%",), {"post": {1, 2, 3, 11, 12, 13}}),
        (True, "INSERT INTO tb_post SELECT $1 + pk_post, gen_random_uuid(), fk_user, title "
               "FROM tb_post WHERE pk_post <= 3 RETURNING *", (100,), {"post": {101, 102, 103}}),
        (True, "UPDATE tb_comment SET text = upper(text) WHERE text LIKE $1 RETURNING text",
         ("c%",), {"post": {1}}),
        (False, "DELETE FROM tb_post WHERE pk_post > $1 AND title LIKE $2", (100, "P%"),
         {"post": {101, 102, 103}}),
        (True, "UPDATE tb_post SET fk_user = fk_user WHERE title LIKE $1 RETURNING fk_user, "
               "pk_post AS post", ("P1%",), {}),
    ]
    async def run(conn: Driver, in_block: bool, sql: str, params: tuple[Any, ...]) -> Result:
        if in_block:
            await conn.control("BEGIN")
        r = await conn.execute(sql, *params)
        if in_block:
            await conn.control("COMMIT")
        return r

    try:
        for in_block, sql, params, must in statements:
            async with refresh(tvf, must=must):
                got = await run(c, in_block, sql, params)
            want = await run(direct, in_block, sql, params)
            assert _comparable(got) == _comparable(want), sql
    finally:
        with psycopg.connect(tvf.pg.dsn("app2"), autocommit=True) as mirror:
            mirror.execute("DROP TABLE IF EXISTS tb_comment, tb_post, tb_user, tb_company")
    assert tvf.one("SELECT count(*) FROM tv_post") == 6


async def test_bulk_update_is_one_refresh_statement(tvf: FixtureF, db: Opener) -> None:
    """Acceptance: an UPDATE of 1000+ rows refreshes tv_post with one statement."""
    c = await db.open(tvf.proxy)
    async with refresh(tvf, must={"post": set(range(100, 1100))}, never=NO_UP):
        r = await c.execute("INSERT INTO tb_post SELECT g, gen_random_uuid(), 1 + g % 3, "
                            "'T' || g FROM generate_series($1::bigint, $2::bigint) g", 100, 1099)
        assert r.tag == "INSERT 0 1000"
    every = set(range(1, 4)) | set(range(100, 1100))
    async with refresh(tvf, must={"post": every}, never=NO_UP) as out:
        r = await c.execute("UPDATE tb_post SET title = title || $1", "!")
        assert r.tag == "UPDATE 1003"
    assert out.delta["post"]["refresh_statements"] == 1
    assert out.delta["*"]["refresh_statements"] == 1
    assert tvf.one("SELECT count(*) FROM tv_post WHERE data->>'title' LIKE '%!'") == 1003
