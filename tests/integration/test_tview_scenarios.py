"""The TVIEW scenarios (shared/scenarios/tviews.md) through the proxy, with the oracle after
every COMMIT: every tv_x equals its v_x."""

from __future__ import annotations

from typing import Any

import asyncpg
import psycopg
import pytest
import tview_fixture

tvf = tview_fixture.tvf  # fixture F on every PostgreSQL version under test
tview_proxy = tview_fixture.tview_proxy


def test_create_through_proxy(tvf: Any) -> None:
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=True) as c:
        row = c.execute("SELECT data->'author'->'company'->>'name', data->'comments' FROM tv_post"
                        " WHERE pk_post = 1").fetchone()
        assert row[0] == "Acme"
        assert [x["id"] for x in row[1]] == [1, 2]
        c.execute("CREATE TABLE foo AS SELECT 1 AS x")
        assert c.execute("SELECT count(*) FROM tvproxy.tview").fetchone()[0] == 3
    tvf.oracle()


@pytest.mark.parametrize("autocommit", [True, False])
def test_psycopg_writes(tvf: Any, autocommit: bool) -> None:
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=autocommit) as c:
        c.execute("UPDATE tb_post SET title = 'P1b' WHERE pk_post = 1")
        c.execute("UPDATE tb_user SET name = %s WHERE pk_user = %s", ("Alicia", 1))
        c.execute("INSERT INTO tb_post VALUES (4, DEFAULT, 3, 'P4')")
        c.execute("UPDATE tb_company SET name = 'Acme Corp' WHERE pk_company = 1")
        c.execute("INSERT INTO tb_comment VALUES (3, DEFAULT, 1, 'c3')")
        c.execute("DELETE FROM tb_comment WHERE pk_comment = 2")
        c.execute("UPDATE tb_post SET fk_user = 3 WHERE pk_post = 2")
        c.commit()
        tvf.oracle()
        got = c.execute("SELECT data->>'title', data->'author'->>'name' FROM tv_post "
                        "WHERE pk_post = 1").fetchone()
        assert got == ("P1b", "Alicia")


async def test_asyncpg_writes(tvf: Any) -> None:
    c = await asyncpg.connect(tvf.proxy.url("app"))
    try:
        await c.execute("UPDATE tb_post SET title = $1 WHERE pk_post = $2", "A", 3)
        async with c.transaction():
            await c.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2", "U", 2)
            await c.execute("UPDATE tb_post SET title = title || '!' WHERE title LIKE 'P%'")
        tvf.oracle()
    finally:
        await c.close()


def test_rollback_and_savepoints(tvf: Any) -> None:
    with psycopg.connect(tvf.proxy.dsn("app")) as c:
        c.execute("UPDATE tb_user SET name = 'S' WHERE pk_user = 1")
        c.execute("SAVEPOINT s")
        c.execute("UPDATE tb_post SET title = 'gone' WHERE pk_post = 3")
        c.execute("ROLLBACK TO s")
        c.commit()
        tvf.oracle()
        c.execute("UPDATE tb_user SET name = 'R' WHERE pk_user = 1")
        c.rollback()
        tvf.oracle()


def test_refresh_failure_fails_commit(tvf: Any) -> None:
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=True) as c:
        c.execute("CREATE TABLE tb_div (pk_div BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT "
                  "gen_random_uuid(), v INT NOT NULL); INSERT INTO tb_div VALUES (1, DEFAULT, 1)")
        c.execute("CREATE TABLE tv_div AS SELECT pk_div, id, jsonb_build_object('x', 1/v) AS data"
                  " FROM tb_div")
    with psycopg.connect(tvf.proxy.dsn("app")) as c:
        c.execute("INSERT INTO tb_div VALUES (2, DEFAULT, 0)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.commit()
        assert c.execute("SELECT count(*) FROM tb_div WHERE pk_div = 2").fetchone()[0] == 0
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("INSERT INTO tb_div VALUES (3, DEFAULT, 0)")
        assert c.execute("SELECT 1").fetchone()[0] == 1


@pytest.mark.parametrize("prepared", [False, True])
def test_child_delete_and_move_refresh_only_their_parents(tvf: Any, prepared: bool) -> None:
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=True, prepare_threshold=0 if prepared
                         else None) as c:
        c.execute("UPDATE tb_comment SET fk_post = %s WHERE pk_comment = %s", (2, 1))
        tvf.oracle()
        c.execute("DELETE FROM tb_comment WHERE pk_comment = %s", (2,))
        tvf.oracle()
        row = c.execute("SELECT data->'comments' FROM tv_post WHERE pk_post = 1").fetchone()
        assert row[0] == []
        c.execute("DELETE FROM tb_comment WHERE pk_comment = 1")
        tvf.oracle()


def test_copy_into_a_tracked_table(tvf: Any) -> None:
    with psycopg.connect(tvf.proxy.dsn("app"), autocommit=True) as c:
        with c.cursor().copy("COPY tb_post (pk_post, fk_user, title) FROM STDIN") as cp:
            cp.write_row((20, 1, "copied"))
            cp.write_row((21, 3, "copied too"))
        tvf.oracle()
        assert c.execute("SELECT count(*) FROM tv_post WHERE pk_post >= 20").fetchone()[0] == 2
