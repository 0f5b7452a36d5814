"""The TVIEW scenarios (shared/scenarios/tviews.md) through the proxy, with the oracle after
every COMMIT: every tv_x equals its v_x."""

from __future__ import annotations

from typing import Any

import asyncpg
import psycopg
import pytest

FIXTURE = """
DROP SCHEMA IF EXISTS tvproxy CASCADE;
DROP TABLE IF EXISTS tv_post, tv_user, tv_company, tv_div, foo CASCADE;
DROP VIEW IF EXISTS v_post, v_user, v_company, v_div CASCADE;
DROP TABLE IF EXISTS tb_comment, tb_post, tb_user, tb_company, tb_div CASCADE;
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

TVIEWS = [
    "CREATE TABLE tv_company AS SELECT pk_company, id, jsonb_build_object('id', id, 'name', name)"
    " AS data FROM tb_company",
    """CREATE TABLE tv_user AS
SELECT u.pk_user, u.id, u.fk_company, v_company.id AS company_id,
       jsonb_build_object('id', u.id, 'name', u.name, 'company', v_company.data) AS data
FROM tb_user u JOIN v_company ON v_company.pk_company = u.fk_company""",
    """CREATE TABLE tv_post AS
SELECT p.pk_post, p.id, p.fk_user, v_user.id AS user_id,
       jsonb_build_object('id', p.id, 'title', p.title, 'author', v_user.data,
         'comments', COALESCE((SELECT jsonb_agg(jsonb_build_object('id', c.pk_comment, 'text', c.text)
                                ORDER BY c.pk_comment) FROM tb_comment c WHERE c.fk_post = p.pk_post), '[]'::jsonb)) AS data
FROM tb_post p JOIN v_user ON v_user.pk_user = p.fk_user""",
]
ENTITIES = ("company", "user", "post")


@pytest.fixture
def fixture_f(pg: Any, proxy: Any) -> Any:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        c.execute(FIXTURE)
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        for ddl in TVIEWS:
            c.execute(ddl)
    yield proxy
    proxy.stop()
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        c.execute(FIXTURE)  # and no catalog left behind for other tests
        c.execute("DROP SCHEMA IF EXISTS tvproxy CASCADE")


def drift(pg: Any) -> dict[str, int]:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        return {e: c.execute(
            f"SELECT count(*) FROM ((TABLE tv_{e} EXCEPT TABLE v_{e}) UNION ALL "
            f"(TABLE v_{e} EXCEPT TABLE tv_{e})) d").fetchone()[0] for e in ENTITIES}


def oracle(pg: Any) -> None:
    assert drift(pg) == {e: 0 for e in ENTITIES}


def test_create_through_proxy(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        row = c.execute("SELECT data->'author'->'company'->>'name', data->'comments' FROM tv_post"
                        " WHERE pk_post = 1").fetchone()
        assert row[0] == "Acme"
        assert [x["id"] for x in row[1]] == [1, 2]
        c.execute("CREATE TABLE foo AS SELECT 1 AS x")
        assert c.execute("SELECT count(*) FROM tvproxy.tview").fetchone()[0] == 3
    oracle(pg)


@pytest.mark.parametrize("autocommit", [True, False])
def test_psycopg_writes(pg: Any, fixture_f: Any, autocommit: bool) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=autocommit) as c:
        c.execute("UPDATE tb_post SET title = 'P1b' WHERE pk_post = 1")
        c.execute("UPDATE tb_user SET name = %s WHERE pk_user = %s", ("Alicia", 1))
        c.execute("INSERT INTO tb_post VALUES (4, DEFAULT, 3, 'P4')")
        c.execute("UPDATE tb_company SET name = 'Acme Corp' WHERE pk_company = 1")
        c.execute("INSERT INTO tb_comment VALUES (3, DEFAULT, 1, 'c3')")
        c.execute("DELETE FROM tb_comment WHERE pk_comment = 2")
        c.execute("UPDATE tb_post SET fk_user = 3 WHERE pk_post = 2")
        c.commit()
        oracle(pg)
        got = c.execute("SELECT data->>'title', data->'author'->>'name' FROM tv_post "
                        "WHERE pk_post = 1").fetchone()
        assert got == ("P1b", "Alicia")


async def test_asyncpg_writes(pg: Any, fixture_f: Any) -> None:
    c = await asyncpg.connect(fixture_f.url("app"))
    try:
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "A", 3)
        async with c.transaction():
            await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "U", 2)
            await c.execute("UPDATE tb_post SET title = title || '!' WHERE title LIKE 'P%'")
        oracle(pg)
    finally:
        await c.close()


def test_rollback_and_savepoints(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("UPDATE tb_user SET name = 'S' WHERE pk_user = 1")
        c.execute("SAVEPOINT s")
        c.execute("UPDATE tb_post SET title = 'gone' WHERE pk_post = 3")
        c.execute("ROLLBACK TO s")
        c.commit()
        oracle(pg)
        c.execute("UPDATE tb_user SET name = 'R' WHERE pk_user = 1")
        c.rollback()
        oracle(pg)


def test_refresh_failure_fails_commit(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        c.execute("CREATE TABLE tb_div (pk_div BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT "
                  "gen_random_uuid(), v INT NOT NULL); INSERT INTO tb_div VALUES (1, DEFAULT, 1)")
        c.execute("CREATE TABLE tv_div AS SELECT pk_div, id, jsonb_build_object('x', 1/v) AS data"
                  " FROM tb_div")
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("INSERT INTO tb_div VALUES (2, DEFAULT, 0)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.commit()
        assert c.execute("SELECT count(*) FROM tb_div WHERE pk_div = 2").fetchone()[0] == 0
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("INSERT INTO tb_div VALUES (3, DEFAULT, 0)")
        assert c.execute("SELECT 1").fetchone()[0] == 1


def stats(proxy: Any) -> dict[str, tuple[int, ...]]:
    with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as c:
        cur = c.execute("SHOW TVIEW STATS")
        names = [d.name for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return {r["tview"]: (r["refresh_statements"], r["keys_enqueued"]) for r in rows
            if r["database"] == "app"}


@pytest.mark.parametrize("prepared", [False, True])
def test_child_delete_and_move_refresh_only_their_parents(pg: Any, fixture_f: Any,
                                                          prepared: bool) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True, prepare_threshold=0 if prepared
                         else None) as c:
        c.execute("UPDATE tb_comment SET fk_post = %s WHERE pk_comment = %s", (2, 1))
        oracle(pg)
        c.execute("DELETE FROM tb_comment WHERE pk_comment = %s", (2,))
        oracle(pg)
        row = c.execute("SELECT data->'comments' FROM tv_post WHERE pk_post = 1").fetchone()
        assert row[0] == []
        c.execute("DELETE FROM tb_comment WHERE pk_comment = 1")
        oracle(pg)


def test_copy_into_a_tracked_table(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        with c.cursor().copy("COPY tb_post (pk_post, fk_user, title) FROM STDIN") as cp:
            cp.write_row((20, 1, "copied"))
            cp.write_row((21, 3, "copied too"))
        oracle(pg)
        assert c.execute("SELECT count(*) FROM tv_post WHERE pk_post >= 20").fetchone()[0] == 2
