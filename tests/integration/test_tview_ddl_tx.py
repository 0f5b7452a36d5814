"""TVIEW DDL inside the client's transaction: CREATE/DROP TABLE tv_x within BEGIN commit or roll
back with the client's transaction, errors abort it as PostgreSQL's own DDL does."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.integration.test_tview_scenarios import fixture_f, oracle  # noqa: F401 - fixture

TV_COMMENT = ("CREATE TABLE tv_comment AS SELECT c.pk_comment, c.id, c.fk_post, "
              "jsonb_build_object('text', c.text, 'post', v_post.data) AS data "
              "FROM tb_comment c JOIN v_post ON v_post.pk_post = c.fk_post")


def _exists(c: psycopg.Connection, rel: str) -> bool:
    return c.execute("SELECT to_regclass(%s) IS NOT NULL", (rel,)).fetchone()[0]


def test_create_and_drop_in_transaction(pg: Any, fixture_f: Any) -> None:  # noqa: F811
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("UPDATE tb_post SET title = 'before' WHERE pk_post = 1")
        cur = c.execute(TV_COMMENT)
        assert cur.statusmessage == "SELECT 2"
        # inside the transaction: it sees its own TVIEW; others do not
        assert c.execute("SELECT count(*) FROM tv_comment").fetchone()[0] == 2
        with psycopg.connect(pg.dsn("app"), autocommit=True) as other:
            assert not _exists(other, "tv_comment")
        c.rollback()
        assert not _exists(c, "tv_comment")
        assert c.execute("SELECT count(*) FROM tvproxy.tview").fetchone()[0] == 3
        c.rollback()
        c.execute(TV_COMMENT)
        c.commit()
        c.execute("UPDATE tb_comment SET text = 'seen' WHERE pk_comment = 1")
        c.execute("UPDATE tb_post SET title = 'cascaded' WHERE pk_post = 1")
        c.commit()
        oracle(pg)
        row = c.execute("SELECT data->>'text', data->'post'->>'title' FROM tv_comment "
                        "WHERE pk_comment = 1").fetchone()
        assert row == ("seen", "cascaded")
        c.execute("DROP TABLE tv_comment")
        c.rollback()
        assert _exists(c, "tv_comment")
        c.execute("DROP TABLE tv_comment")
        c.commit()
        assert not _exists(c, "tv_comment") and not _exists(c, "v_comment")


def test_errors_abort_the_transaction(pg: Any, fixture_f: Any) -> None:  # noqa: F811
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DuplicateTable):
            c.execute("CREATE TABLE tv_post AS SELECT pk_post, id, '{}'::jsonb AS data "
                      "FROM tb_post")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        with pytest.raises(psycopg.errors.DependentObjectsStillExist):
            c.execute("DROP TABLE tv_user")
        c.rollback()
        with pytest.raises(psycopg.errors.UndefinedColumn):
            c.execute("CREATE TABLE tv_x AS SELECT 1 AS pk_x")
        c.rollback()
        assert c.execute("SELECT count(*) FROM tvproxy.tview").fetchone()[0] == 3
    oracle(pg)
