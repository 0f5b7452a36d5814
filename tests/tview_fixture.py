"""Fixture F of the TVIEW scenarios (shared/scenarios/tviews.md) and its oracle.

- :data:`FIXTURE` / :func:`base_ddl`: the tb_ tables and rows of F (in ``public``, dropping
  what a previous test left, or in a schema of its own); :data:`TVIEWS`: the three
  ``CREATE TABLE tv_x AS SELECT`` statements, run through the proxy;
  :func:`direct_tviews_ddl`: the same views and tv_ tables made without the proxy.
- :func:`drift` / :func:`oracle`: every TVIEW of the catalog equals its view, ``EXCEPT ALL`` both
  ways over the view's columns.  :func:`stats`: ``SHOW TVIEW STATS`` by TVIEW.
- Fixtures (import them into a test module as ``fixture_f = tview_fixture.fixture_f``):
  ``fixture_f`` (F on the ``pg`` server behind a proxy of its own; yields the proxy) and
  ``tvf`` / ``tvf_base`` (F, or its tb_ tables only, on every server of ``tview_pg`` behind
  ``tview_proxy``, one proxy per module and server; yield a :class:`FixtureF`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from conftest import Proxies
from harness import ProxyProcess, wait_until

ENTITIES = ("company", "user", "post")

# The SELECT of each TVIEW of F, in creation (dependency) order.
SELECTS: dict[str, str] = {
    "company": "SELECT pk_company, id, jsonb_build_object('id', id, 'name', name) AS data"
               " FROM tb_company",
    "user": """
SELECT u.pk_user, u.id, u.fk_company, v_company.id AS company_id,
       jsonb_build_object('id', u.id, 'name', u.name, 'company', v_company.data) AS data
FROM tb_user u JOIN v_company ON v_company.pk_company = u.fk_company""",
    "post": """
SELECT p.pk_post, p.id, p.fk_user, v_user.id AS user_id,
       jsonb_build_object('id', p.id, 'title', p.title, 'author', v_user.data,
         'comments', COALESCE((SELECT jsonb_agg(jsonb_build_object('id', c.pk_comment, 'text', c.text)
                                ORDER BY c.pk_comment) FROM tb_comment c WHERE c.fk_post = p.pk_post), '[]'::jsonb)) AS data
FROM tb_post p JOIN v_user ON v_user.pk_user = p.fk_user""",
}

TVIEWS = [f"CREATE TABLE tv_{e} AS {SELECTS[e].strip()}" for e in ENTITIES]

_DROP = """
DROP SCHEMA IF EXISTS tvproxy CASCADE;
DROP TABLE IF EXISTS tv_post, tv_user, tv_company, tv_div, foo CASCADE;
DROP VIEW IF EXISTS v_post, v_user, v_company, v_div CASCADE;
DROP TABLE IF EXISTS tb_comment, tb_post, tb_user, tb_company, tb_div CASCADE;
"""

_TABLES = """
CREATE TABLE tb_company (pk_company BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(), name TEXT NOT NULL);
CREATE TABLE tb_user (pk_user BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  fk_company BIGINT NOT NULL REFERENCES tb_company, name TEXT NOT NULL, email TEXT);
CREATE TABLE tb_post (pk_post BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  fk_user BIGINT NOT NULL REFERENCES tb_user, title TEXT NOT NULL);
CREATE TABLE tb_comment (pk_comment BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  fk_post BIGINT NOT NULL REFERENCES tb_post, text TEXT);
INSERT INTO tb_company VALUES (1, DEFAULT, 'Acme'), (2, DEFAULT, 'Globex');
INSERT INTO tb_user VALUES (1, DEFAULT, 1, 'Alice', 'a@x'), (2, DEFAULT, 1, 'Bob', 'b@x'), (3, DEFAULT, 2, 'Carol', 'c@x');
INSERT INTO tb_post VALUES (1, DEFAULT, 1, 'P1'), (2, DEFAULT, 1, 'P2'), (3, DEFAULT, 2, 'P3');
INSERT INTO tb_comment VALUES (1, DEFAULT, 1, 'c1'), (2, DEFAULT, 1, 'c2');
"""


def base_ddl(schema: str = "public") -> str:
    """The tb_ tables of F with their rows.  In ``public`` it first drops what the TVIEW tests
    make (the catalog schema included); in another schema it creates that schema and points
    ``search_path`` at it for the rest of the transaction (run it inside one)."""
    if schema == "public":
        return _DROP + _TABLES
    return f"CREATE SCHEMA {schema};\nSET LOCAL search_path = {schema};\n" + _TABLES


def direct_tviews_ddl() -> str:
    """F's views and tv_ tables (with their primary keys) made straight on the server, in the
    current ``search_path``: what the proxy's ``CREATE TABLE tv_x AS`` makes, minus catalog."""
    out = []
    for e in ENTITIES:
        out.append(f"CREATE VIEW v_{e} AS {SELECTS[e].strip()};")
        out.append(f"CREATE TABLE tv_{e} AS SELECT * FROM v_{e};")
        out.append(f"ALTER TABLE tv_{e} ADD PRIMARY KEY (pk_{e});")
    return "\n".join(out) + "\n"


FIXTURE = base_ddl()


# --------------------------------------------------------------------------------------------
# Oracle and statistics


@dataclass(frozen=True)
class Tview:
    entity: str
    table: str
    view: str
    pk: str


def tviews(conn: psycopg.Connection) -> list[Tview]:
    """The TVIEWs of the catalog (none when there is no catalog yet)."""
    if conn.execute("SELECT to_regclass('tvproxy.tview') IS NULL").fetchone()[0]:
        return []
    rows = conn.execute("SELECT entity, table_name, view_name, pk_column FROM tvproxy.tview"
                        " ORDER BY entity").fetchall()
    return [Tview(*r) for r in rows]


def view_columns(conn: psycopg.Connection, view: str) -> list[str]:
    rows = conn.execute("SELECT attname::text FROM pg_attribute WHERE attrelid = %s::regclass"
                        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (view,)).fetchall()
    return [r[0] for r in rows]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _diff_sql(tv: Tview, cols: list[str]) -> str:
    c = ", ".join(_ident(x) for x in cols)
    t, v = _ident(tv.table), _ident(tv.view)
    return (f"(SELECT 'missing from {tv.table}' AS side, {c} FROM {v} EXCEPT ALL SELECT"
            f" 'missing from {tv.table}', {c} FROM {t}) UNION ALL (SELECT 'extra in {tv.table}',"
            f" {c} FROM {t} EXCEPT ALL SELECT 'extra in {tv.table}', {c} FROM {v})")


def drift_rows(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Per TVIEW entity: the rows by which tv_x and v_x differ (view's columns)."""
    out = {}
    for tv in tviews(conn):
        out[tv.entity] = conn.execute(_diff_sql(tv, view_columns(conn, tv.view))).fetchall()
    return out


def drift(pg: Any, dbname: str = "app") -> dict[str, int]:
    """Per TVIEW entity: how many rows tv_x and v_x differ by (0 everywhere = oracle holds)."""
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as c:
        return {e: len(rows) for e, rows in drift_rows(c).items()}


def oracle(pg: Any, dbname: str = "app", entities: tuple[str, ...] = ENTITIES) -> None:
    """Every TVIEW equals its view; ``entities`` at least exist."""
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as c:
        rows = drift_rows(c)
    missing = set(entities) - set(rows)
    assert not missing, f"TVIEWs missing from the catalog: {sorted(missing)}"
    bad = {e: r for e, r in rows.items() if r}
    assert not bad, f"oracle: tv_x differs from v_x: {bad}"


def admin(proxy: ProxyProcess) -> psycopg.Connection:
    """A connection to the proxy's admin console."""
    return psycopg.connect(proxy.dsn("pgbouncer", user="postgres"), autocommit=True)


def show_stats(conn: psycopg.Connection, dbname: str = "app") -> dict[str, dict[str, Any]]:
    cur = conn.execute("SHOW TVIEW STATS")
    names = [d.name for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return {r["tview"]: r for r in rows if r["database"] == dbname}


def stats(proxy: ProxyProcess, dbname: str = "app") -> dict[str, dict[str, Any]]:
    """``SHOW TVIEW STATS`` rows of ``dbname`` by tview (``*``: the database's totals)."""
    with admin(proxy) as c:
        return show_stats(c, dbname)


def refresh_events(proxy: ProxyProcess, since: int = 0) -> list[dict[str, Any]]:
    """The proxy's ``tview refresh`` log events (JSON lines) after byte ``since`` of its log."""
    out = []
    for line in proxy.logs()[since:].splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "tview refresh":
                out.append(event)
    return out


def rollback_prepared(pg: Any, dbname: str = "app") -> None:
    """Roll back prepared transactions left in ``dbname`` (they would hold their locks)."""
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as c:
        for (gid,) in c.execute("SELECT gid FROM pg_prepared_xacts WHERE database = %s",
                                (dbname,)).fetchall():
            c.execute(f"ROLLBACK PREPARED '{gid}'")


def reset(pg: Any, proxy: ProxyProcess | None, dbname: str = "app",
          with_tviews: bool = True) -> None:
    """A fresh F in ``dbname``: tb_ tables straight on the server, TVIEWs through ``proxy``."""
    rollback_prepared(pg, dbname)
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as c:
        c.execute(FIXTURE)
    if with_tviews:
        assert proxy is not None
        with psycopg.connect(proxy.dsn(dbname), autocommit=True) as c:
            for ddl in TVIEWS:
                c.execute(ddl)


_AS_MADE = """
SELECT (SELECT array_agg(entity::text ORDER BY entity) FROM tvproxy.tview) = '{company,post,user}'
   AND (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace
         AND relkind IN ('r', 'v', 'm', 'p', 'f')) = 10
"""

_REFILL = ("TRUNCATE tv_post, tv_user, tv_company, tb_comment, tb_post, tb_user, tb_company;"
           + _TABLES[_TABLES.index("INSERT"):]
           + "".join(f"INSERT INTO tv_{e} SELECT * FROM v_{e};" for e in ENTITIES))


def refill(pg: Any, proxy: ProxyProcess, dbname: str = "app") -> None:
    """:func:`reset`, quicker when only rows changed since F was made: when the catalog and the
    relations are F's (4 tb_, 3 v_, 3 tv_ in ``public``), put F's rows back (tv_ rows from the
    views) instead of making everything again."""
    rollback_prepared(pg, dbname)
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as c:
        if tviews(c) and c.execute(_AS_MADE).fetchone()[0]:
            with c.transaction():
                c.execute(_REFILL)
            return
    reset(pg, proxy, dbname)


def cleanup(pg: Any, dbname: str = "app") -> None:
    """What a TVIEW test leaves for the next module: F's tables, no TVIEW, no catalog."""
    rollback_prepared(pg, dbname)
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as c:
        c.execute(FIXTURE)
        c.execute("DROP SCHEMA IF EXISTS tvproxy CASCADE")


# --------------------------------------------------------------------------------------------
# Which rows a transaction refreshed

STAMP = "__tvproxy_test_stamp"


@dataclass
class FixtureF:
    """F on one server behind one proxy, with the oracle and refresh accounting.

    :meth:`stamp` marks every tv_ row straight on the server (a key in ``data`` the views never
    produce); a refresh recomputes a row it covers and so drops the mark.  :meth:`unstamp`
    then tells which rows were refreshed (or deleted, or created) and removes the marks, so
    the oracle runs on the rows as the proxy left them.
    """

    pg: Any
    proxy: ProxyProcess
    dbname: str = "app"
    _stamped: dict[str, set[Any]] = field(default_factory=dict)
    _conn: psycopg.Connection | None = None
    _admin: dict[int, psycopg.Connection] = field(default_factory=dict)

    def connect(self) -> psycopg.Connection:
        """A new plain connection straight to the server (not through the proxy)."""
        return psycopg.connect(self.pg.dsn(self.dbname), autocommit=True)

    @property
    def conn(self) -> psycopg.Connection:
        """This fixture's own connection straight to the server (autocommit)."""
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for conn in self._admin.values():
            conn.close()
        self._admin.clear()

    def oracle(self, entities: tuple[str, ...] = ENTITIES) -> None:
        rows = drift_rows(self.conn)
        missing = set(entities) - set(rows)
        assert not missing, f"TVIEWs missing from the catalog: {sorted(missing)}"
        bad = {e: r for e, r in rows.items() if r}
        assert not bad, f"oracle: tv_x differs from v_x: {bad}"

    def drift(self) -> dict[str, int]:
        return {e: len(rows) for e, rows in drift_rows(self.conn).items()}

    def stats(self, proxy: ProxyProcess | None = None) -> dict[str, dict[str, Any]]:
        """``SHOW TVIEW STATS`` of ``proxy`` (this fixture's by default), on a kept connection."""
        proxy = proxy or self.proxy
        conn = self._admin.get(id(proxy))
        if conn is None or conn.closed:
            conn = self._admin[id(proxy)] = admin(proxy)
        return show_stats(conn, self.dbname)

    def one(self, sql: str, *params: Any) -> Any:
        """First column of the first row of ``sql`` run straight on the server."""
        row = self.conn.execute(sql, params or None).fetchone()
        return None if row is None else row[0]

    def stamp(self) -> None:
        self._stamped = {}
        c = self.conn
        with c.transaction():
            for tv in tviews(c):
                t, pk = _ident(tv.table), _ident(tv.pk)
                c.execute(f"UPDATE {t} SET data = data || jsonb_build_object('{STAMP}', true)")
                self._stamped[tv.entity] = {r[0] for r in c.execute(f"SELECT {pk} FROM {t}")}

    def unstamp(self) -> dict[str, set[Any]]:
        """Per TVIEW entity: keys refreshed since :meth:`stamp` (rows recomputed, deleted or
        added); the marks are removed."""
        out: dict[str, set[Any]] = {}
        c = self.conn
        with c.transaction():
            for tv in tviews(c):
                t, pk = _ident(tv.table), _ident(tv.pk)
                rows = c.execute(f"SELECT {pk}, data ? '{STAMP}' FROM {t}").fetchall()
                stamped = self._stamped.get(tv.entity, set())
                present = {r[0] for r in rows}
                out[tv.entity] = ({k for k, marked in rows if not marked}
                                  | (stamped - present))
                c.execute(f"UPDATE {t} SET data = data - '{STAMP}' WHERE data ? '{STAMP}'")
        self._stamped = {}
        return out


def _proxy_for(pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proxies = Proxies(pg, tmp_path_factory)
    try:
        yield proxies()
    finally:
        proxies.stop_all()
        cleanup(pg)


@pytest.fixture
def fixture_f(pg: Any, proxy: ProxyProcess) -> Iterator[ProxyProcess]:
    """F on ``pg``, TVIEWs created through ``proxy`` (a proxy of this test); yields the proxy."""
    reset(pg, proxy)
    yield proxy
    proxy.stop()
    cleanup(pg)  # and no catalog left behind for other tests


@pytest.fixture(scope="module")
def tview_proxy(tview_pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy in front of ``tview_pg`` (default test config) shared by one module's tests."""
    yield from _proxy_for(tview_pg, tmp_path_factory)


def _tvf(pg: Any, proxy: ProxyProcess, with_tviews: bool) -> Iterator[FixtureF]:
    if not proxy.running:  # a test stopped it
        proxy.start()
    if with_tviews:
        refill(pg, proxy)
    else:
        reset(pg, proxy, with_tviews=False)
    fx = FixtureF(pg, proxy)
    try:
        yield fx
    finally:
        fx.close()
        rollback_prepared(pg)


@pytest.fixture
def tvf(tview_pg: Any, tview_proxy: ProxyProcess) -> Iterator[FixtureF]:
    """A fresh F (TVIEWs created through the proxy) on each server of ``tview_pg``."""
    yield from _tvf(tview_pg, tview_proxy, True)


@pytest.fixture
def tvf_base(tview_pg: Any, tview_proxy: ProxyProcess) -> Iterator[FixtureF]:
    """F's tb_ tables only (no TVIEW, no catalog) on each server of ``tview_pg``."""
    yield from _tvf(tview_pg, tview_proxy, False)


def wait_for_stats(fx: FixtureF, pred: Any, proxy: ProxyProcess | None = None,
                   timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """``SHOW TVIEW STATS`` once ``pred(stats)`` holds (or after ``timeout``)."""
    box: dict[str, Any] = {}

    def ok() -> bool:
        box["s"] = fx.stats(proxy)
        return bool(pred(box["s"]))

    wait_until(ok, timeout)
    return box["s"]
