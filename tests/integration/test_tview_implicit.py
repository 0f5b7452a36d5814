"""Autocommit writes in the extended protocol: the refresh plan runs inside PostgreSQL's own
implicit transaction of the client's batch (no BEGIN, no COMMIT: the plan replaces the client's
Sync), so the write and its refresh commit or fail together.  What must hold: the client sees
exactly its own replies; a failing statement of the client skips the plan (and the proxy
forgets the plan statements that were never prepared); a failing plan rolls the write back;
keys that come back in an appended RETURNING turn the batch into a block first."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
import tview_fixture
from tview_fixture import oracle

fixture_f = tview_fixture.fixture_f


def _server_statements(pg: Any) -> list[str]:
    """What the proxy's servers ran last (pg_stat_activity.query of idle proxy backends)."""
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        return [r[0] for r in d.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = 'app' AND pid <> "
            "pg_backend_pid() AND backend_type = 'client backend' AND application_name"
            " NOT LIKE 'tvproxy-listener%'").fetchall()]


def _div_tview(proxy: Any) -> None:
    """tb_div and tv_div through ``proxy``: a refresh of a row with v = 0 fails (22012)."""
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        c.execute("CREATE TABLE tb_div (pk_div BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT "
                  "gen_random_uuid(), v INT NOT NULL); INSERT INTO tb_div VALUES (1, DEFAULT, 1)")
        c.execute("CREATE TABLE tv_div AS SELECT pk_div, id, jsonb_build_object('q', 10 / v)"
                  " AS data FROM tb_div")


def test_autocommit_write_refreshes_without_begin_or_commit(pg: Any, fixture_f: Any) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(fixture_f.url("app"), statement_cache_size=0)
        try:
            for i in range(3):  # the second and third reuse the plan prepared by the first
                status = await conn.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2",
                                            f"t{i}", 1)
                assert status == "UPDATE 1"
                assert not conn.is_in_transaction()
                oracle(pg)
        finally:
            await conn.close()

    asyncio.run(run())
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        assert d.execute("SELECT data->>'title' FROM tv_post WHERE pk_post = 1").fetchone() == (
            "t2",)
    # the last thing the server ran for the client is the refresh itself, not a COMMIT
    assert not any(q.strip().upper() == "COMMIT" for q in _server_statements(pg))


def test_failing_statement_skips_the_plan(pg: Any, fixture_f: Any) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(fixture_f.url("app"), statement_cache_size=0)
        try:
            # the first batch of this shape fails: its plan statements were sent for
            # preparing but skipped by the server; the next batch must prepare them again
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await conn.execute("UPDATE tb_post SET fk_user = $1 WHERE pk_post = $2", 99, 2)
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 1") == 1
            await conn.execute("UPDATE tb_post SET fk_user = $1 WHERE pk_post = $2", 3, 2)
            oracle(pg)
            with pytest.raises(asyncpg.NotNullViolationError):
                await conn.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", None, 2)
            await conn.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "again", 2)
        finally:
            await conn.close()

    asyncio.run(run())
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        assert d.execute("SELECT fk_user, data->>'title' FROM tv_post WHERE pk_post = 2"
                         ).fetchone() == (3, "again")
    oracle(pg)


def test_failing_plan_rolls_the_write_back(pg: Any, fixture_f: Any) -> None:
    _div_tview(fixture_f)

    async def run() -> None:
        conn = await asyncpg.connect(fixture_f.url("app"))
        try:
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute("UPDATE tb_div SET v = $1 WHERE pk_div = $2", 0, 1)
            assert not conn.is_in_transaction()
            await conn.execute("UPDATE tb_div SET v = $1 WHERE pk_div = $2", 5, 1)
        finally:
            await conn.close()

    asyncio.run(run())
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        assert d.execute("SELECT v FROM tb_div").fetchone() == (5,)  # the 0 was rolled back
        assert d.execute("SELECT data->>'q' FROM tv_div").fetchone() == ("2",)
    oracle(pg, entities=("company", "user", "post", "div"))


def test_keys_from_returning_and_pipelines(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        # keys unknown from the text: an appended RETURNING brings them, after the Sync
        cur = c.execute("UPDATE tb_post SET title = %s WHERE title = %s", ("by title", "P3"))
        assert cur.rowcount == 1 and cur.description is None
        oracle(pg)
        # several statements, one Sync: one implicit transaction, one plan
        with c.pipeline():
            c.execute("UPDATE tb_post SET title = %s WHERE pk_post = %s", ("pp1", 1))
            c.execute("UPDATE tb_user SET name = %s WHERE pk_user = %s", ("Alicia", 1))
            c.execute("INSERT INTO tb_comment (pk_comment, fk_post, text) VALUES (%s, %s, %s)",
                      (10, 1, "c10"))
        oracle(pg)
        # a failure in the middle of a pipeline: nothing of it commits, the plan neither
        with pytest.raises(psycopg.errors.ForeignKeyViolation), c.pipeline():
            c.execute("UPDATE tb_post SET title = %s WHERE pk_post = %s", ("lost", 2))
            c.execute("UPDATE tb_post SET fk_user = %s WHERE pk_post = %s", (42, 2))
        assert c.execute("SELECT title FROM tb_post WHERE pk_post = 2").fetchone() == ("P2",)
        oracle(pg)
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        got = d.execute("SELECT data->>'title', data->'author'->>'name',"
                        " jsonb_array_length(data->'comments') FROM tv_post WHERE pk_post = 1"
                        ).fetchone()
    assert got == ("pp1", "Alicia", 3)


def test_keys_written_again_count_as_coalesced(pg: Any, fixture_f: Any) -> None:
    before = tview_fixture.stats(fixture_f)
    with psycopg.connect(fixture_f.dsn("app")) as c:
        for i in range(10):  # ten writes of one row: one refresh of it
            c.execute("UPDATE tb_user SET name = %s WHERE pk_user = 2", (f"Bob {i}",))
    after = tview_fixture.stats(fixture_f)

    def delta(tview: str, counter: str) -> int:
        return int(after[tview][counter]) - int(before.get(tview, {}).get(counter, 0))

    assert delta("tv_user", "keys_coalesced") == 9
    assert delta("*", "keys_coalesced") == 9
    assert delta("tv_user", "rows_refreshed") == 1
    oracle(pg)


def test_simple_query_autocommit_write(pg: Any, fixture_f: Any) -> None:
    """One write in a simple Query runs as an unnamed extended statement closed by the plan;
    the client still gets a simple Query's replies (asyncpg's execute() without arguments
    sends a simple Query)."""
    _div_tview(fixture_f)

    async def run() -> None:
        conn = await asyncpg.connect(fixture_f.url("app"))
        try:
            assert await conn.execute("UPDATE tb_post SET title = 's1' WHERE pk_post = 1") == (
                "UPDATE 1")
            oracle(pg)
            assert not any(q.strip().upper() == "COMMIT" for q in _server_statements(pg))
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await conn.execute("UPDATE tb_post SET fk_user = 77 WHERE pk_post = 1")
            with pytest.raises(asyncpg.DivisionByZeroError):  # the plan fails: rolled back
                await conn.execute("UPDATE tb_div SET v = 0 WHERE pk_div = 1")
            assert not conn.is_in_transaction()
            # two statements in one Query, and rows returned: the Query goes as it is
            await conn.execute("UPDATE tb_post SET title = 's2' WHERE pk_post = 2;"
                               " UPDATE tb_post SET title = 's3' WHERE pk_post = 3")
            rows = await conn.fetch("UPDATE tb_post SET title = 's4' WHERE pk_post = 1"
                                    " RETURNING pk_post, title")
            assert [tuple(r) for r in rows] == [(1, "s4")]
        finally:
            await conn.close()

    asyncio.run(run())
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        assert d.execute("SELECT v FROM tb_div").fetchone() == (1,)
        assert d.execute("SELECT pk_post, data->>'title' FROM tv_post ORDER BY 1").fetchall(
            ) == [(1, "s4"), (2, "s2"), (3, "s3")]
    oracle(pg, entities=("company", "user", "post", "div"))


def test_tview_ddl_brings_no_catalog_notices(pg: Any, fixture_f: Any) -> None:
    """The catalog exists already: creating and dropping a TVIEW tells the client nothing of
    the proxy's own idempotent catalog DDL ("relation ... already exists, skipping")."""
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        d.execute("DROP TABLE IF EXISTS tb_label CASCADE; CREATE TABLE tb_label (pk_label"
                  " BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(), name TEXT);"
                  " INSERT INTO tb_label VALUES (1, DEFAULT, 'x')")
    notices: list[str] = []
    try:
        with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
            c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            c.execute("CREATE TABLE tv_label AS SELECT pk_label, id,"
                      " jsonb_build_object('name', name) AS data FROM tb_label")
            c.execute("DROP TABLE tv_label")
    finally:
        with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
            d.execute("DROP TABLE IF EXISTS tb_label CASCADE")
    assert notices == []
