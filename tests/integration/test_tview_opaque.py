"""Opaque writers (CALL, DO, functions, triggers, cascading foreign keys) through the proxy: the
write counters of the tracked tables are compared at the next statement or COMMIT, and the
dependents of tables written behind the proxy's back are refreshed fully (or the COMMIT fails,
``opaque_writes = reject``)."""

from __future__ import annotations

from typing import Any

import asyncpg
import psycopg
import pytest
import tview_fixture
from tview_fixture import oracle

fixture_f = tview_fixture.fixture_f

WRITERS = """
CREATE FUNCTION rename_user(k bigint, n text) RETURNS int LANGUAGE plpgsql AS
$$BEGIN UPDATE tb_user SET name = n WHERE pk_user = k; RETURN 1; END$$;
CREATE PROCEDURE rename_company(k bigint, n text) LANGUAGE sql AS
$$UPDATE tb_company SET name = n WHERE pk_company = k$$;
CREATE TABLE tb_log (pk_log bigserial PRIMARY KEY, fk_post bigint, note text);
CREATE FUNCTION log_retitles() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN UPDATE tb_post SET title = NEW.note WHERE pk_post = NEW.fk_post; RETURN NEW; END$$;
CREATE TRIGGER log_retitles AFTER INSERT ON tb_log FOR EACH ROW EXECUTE FUNCTION log_retitles();
"""


def _title(c: psycopg.Connection, pk: int) -> str:
    return c.execute("SELECT data->>'title' FROM tv_post WHERE pk_post = %s", (pk,)).fetchone()[0]


def _author(c: psycopg.Connection, pk: int) -> str:
    return c.execute("SELECT data->'author'->>'name' FROM tv_post WHERE pk_post = %s",
                     (pk,)).fetchone()[0]


@pytest.fixture
def writers(pg: Any, fixture_f: Any) -> Any:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        c.execute(WRITERS)  # through the proxy: it reloads what it audits before answering
    yield fixture_f
    _drop_writers(pg)


def _drop_writers(pg: Any) -> None:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS tb_log; DROP FUNCTION IF EXISTS rename_user, "
                  "log_retitles; DROP PROCEDURE IF EXISTS rename_company")


def test_do_call_and_functions_autocommit(pg: Any, writers: Any) -> None:
    with psycopg.connect(writers.dsn("app"), autocommit=True) as c:
        c.execute("DO $$BEGIN UPDATE tb_user SET name = 'Dora' WHERE pk_user = 1; END$$")
        oracle(pg)
        assert _author(c, 1) == "Dora"
        c.execute("CALL rename_company(1, 'Called')")
        oracle(pg)
        c.execute("SELECT rename_user(%s, %s)", (2, "Fun"))
        oracle(pg)
        assert _author(c, 3) == "Fun"


def test_opaque_inside_transactions(pg: Any, writers: Any) -> None:
    with psycopg.connect(writers.dsn("app")) as c:
        c.execute("UPDATE tb_post SET title = 'known' WHERE pk_post = 1")
        c.execute("SELECT rename_user(2, 'Carla')")
        c.execute("UPDATE tb_post SET title = 'known2' WHERE pk_post = 2")
        c.commit()
        oracle(pg)
        assert _author(c, 3) == "Carla"
        c.commit()
        # the opaque statement is the last before COMMIT: the plan reads the answer itself
        c.execute("CALL rename_company(2, 'Late')")
        c.commit()
        oracle(pg)
    with psycopg.connect(writers.dsn("app"), autocommit=True) as c:
        # the refresh cannot run in the middle of one query string: refused, nothing written
        for text in ("BEGIN; DO $$BEGIN UPDATE tb_user SET name = 'Pipe' WHERE pk_user = 2;"
                     " END$$; COMMIT", "UPDATE tb_user SET name = 'Pipe' WHERE pk_user = 2; "
                     "COMMIT; SELECT 1"):
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                c.execute(text)
            assert c.execute("SELECT name FROM tb_user WHERE pk_user = 2").fetchone()[0] == "Carla"
        c.execute("BEGIN; SELECT 1; COMMIT")  # nothing tracked: as PostgreSQL does it
        oracle(pg)


def test_triggers_and_savepoints(pg: Any, writers: Any) -> None:
    with psycopg.connect(writers.dsn("app")) as c:
        c.execute("INSERT INTO tb_log (fk_post, note) VALUES (2, 'by trigger')")
        c.commit()
        oracle(pg)
        assert _title(c, 2) == "by trigger"
        c.execute("UPDATE tb_user SET name = 'Kept' WHERE pk_user = 1")
        c.execute("SAVEPOINT s")
        c.execute("INSERT INTO tb_log (fk_post, note) VALUES (3, 'undone')")
        c.execute("ROLLBACK TO SAVEPOINT s")
        c.commit()
        oracle(pg)
        assert _title(c, 3) == "P3"
        assert _author(c, 1) == "Kept"


def test_cascading_foreign_keys(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        c.execute("ALTER TABLE tb_post DROP CONSTRAINT tb_post_fk_user_fkey, ADD FOREIGN KEY "
                  "(fk_user) REFERENCES tb_user ON UPDATE CASCADE ON DELETE CASCADE")
        c.execute("ALTER TABLE tb_comment DROP CONSTRAINT tb_comment_fk_post_fkey, ADD FOREIGN "
                  "KEY (fk_post) REFERENCES tb_post ON DELETE CASCADE")
        c.execute("UPDATE tb_user SET pk_user = 10 WHERE pk_user = 1")
        oracle(pg)
        assert c.execute("SELECT fk_user FROM tv_post WHERE pk_post = 1").fetchone()[0] == 10
        c.execute("DELETE FROM tb_user WHERE pk_user = 10")
        oracle(pg)
        assert c.execute("SELECT count(*) FROM tv_post").fetchone()[0] == 1


def test_errors_in_aborted_transactions(pg: Any, writers: Any) -> None:
    with psycopg.connect(writers.dsn("app"), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("UPDATE tb_user SET name = 'Never' WHERE pk_user = 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("DO $$BEGIN PERFORM 1/0; END$$")
        cur = c.execute("COMMIT")  # of a failed transaction: ROLLBACK, as PostgreSQL says
        assert cur.statusmessage == "ROLLBACK"
        assert c.execute("SELECT name FROM tb_user WHERE pk_user = 1").fetchone()[0] == "Alice"
        c.execute("BEGIN")
        c.execute("SELECT rename_user(1, 'Gone')")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 1/0")
        c.execute("ROLLBACK")
        oracle(pg)
        assert _author(c, 1) == "Alice"


async def test_asyncpg_prepared_opaque(pg: Any, writers: Any) -> None:
    conn = await asyncpg.connect(writers.url("app"))
    try:
        stmt = await conn.prepare("SELECT rename_user($1, $2)")
        for i in range(3):
            await stmt.fetchval(1, f"Prep{i}")
            oracle(pg)
        async with conn.transaction():
            await stmt.fetchval(2, "InTx")
            await conn.execute("UPDATE tb_post SET title = 'T' WHERE pk_post = 3")
        oracle(pg)
        assert await conn.fetchval("SELECT data->'author'->>'name' FROM tv_post "
                                   "WHERE pk_post = 3") == "InTx"
    finally:
        await conn.close()


def test_reject_policy(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(tview={"opaque_writes": "reject"})
    try:
        tview_fixture.reset(pg, proxy)
        with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
            c.execute(WRITERS)
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                c.execute("DO $$BEGIN UPDATE tb_user SET name = 'No' WHERE pk_user = 1; END$$")
            assert "tb_user" in str(err.value)
            assert c.execute("SELECT name FROM tb_user WHERE pk_user = 1").fetchone()[0] == "Alice"
            c.execute("UPDATE tb_user SET name = 'Yes' WHERE pk_user = 1")  # captured: fine
            with pytest.raises(psycopg.errors.FeatureNotSupported), c.transaction():
                c.execute("SELECT rename_user(2, 'No')")
            c.execute("SELECT rename_user(99, 'x')")  # wrote no row: allowed
        oracle(pg)
    finally:
        proxy.stop()
        _drop_writers(pg)
        tview_fixture.cleanup(pg)
