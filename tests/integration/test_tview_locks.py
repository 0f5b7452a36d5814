"""PostgreSQL's lock discipline for TVIEW refreshes through the proxy: transactions wait for each
other only where one rewrites a tv_ row the other rewrites or reads.  Children inserted under
one parent (also by prepared transactions) do not wait; a rename of that parent does wait for
them, and the client's own lock_timeout decides how long, with PostgreSQL's error."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import tview_fixture
from tview_fixture import oracle

fixture_f = tview_fixture.fixture_f


def _insert_post(conn: psycopg.Connection, pk: int, user: int = 1) -> None:
    conn.execute("SET LOCAL lock_timeout = '5s'")  # a wait would fail the test, not hang it
    conn.execute("INSERT INTO tb_post (pk_post, fk_user, title) VALUES (%s, %s, %s)",
                 (pk, user, f"post {pk}"))


def test_five_prepared_inserts_under_one_parent_do_not_wait(pg: Any, fixture_f: Any) -> None:
    conns = [psycopg.connect(fixture_f.dsn("app")) for _ in range(5)]
    try:
        for i, c in enumerate(conns):
            _insert_post(c, 100 + i)
            c.execute(f"PREPARE TRANSACTION 'hot{i}'")  # every one prepares, none waits
        with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
            gids = {r[0] for r in d.execute("SELECT gid FROM pg_prepared_xacts").fetchall()}
            assert {f"hot{i}" for i in range(5)} <= gids
        with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
            for i in range(5):
                c.execute(f"COMMIT PREPARED 'hot{i}'")
    finally:
        for c in conns:
            c.close()
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        authors = d.execute("SELECT data->'author'->>'name' FROM tv_post WHERE pk_post >= 100"
                            " ORDER BY pk_post").fetchall()
    assert authors == [("Alice",)] * 5
    oracle(pg)


def test_hot_parent_children_pass_a_rename_waits(pg: Any, fixture_f: Any) -> None:
    held = psycopg.connect(fixture_f.dsn("app"))
    try:
        _insert_post(held, 200)
        held.execute("PREPARE TRANSACTION 'held'")  # holds its locks until COMMIT PREPARED
        # another child under the same parent: no wait (PostgreSQL itself would not wait)
        with psycopg.connect(fixture_f.dsn("app")) as c:
            _insert_post(c, 201)
        # a rename of the parent rewrites every post of it, the prepared one's too: a real
        # conflict; the client's lock_timeout applies and the error is PostgreSQL's
        with psycopg.connect(fixture_f.dsn("app")) as c, pytest.raises(
                psycopg.errors.LockNotAvailable):
            c.execute("SET LOCAL lock_timeout = '300ms'")
            c.execute("UPDATE tb_user SET name = 'Alicia' WHERE pk_user = 1")
            c.commit()
        oracle(pg)  # the failed COMMIT rolled the rename back, base rows included
        with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
            c.execute("COMMIT PREPARED 'held'")
        with psycopg.connect(fixture_f.dsn("app")) as c:  # now it goes through
            c.execute("SET LOCAL lock_timeout = '5s'")
            c.execute("UPDATE tb_user SET name = 'Alicia' WHERE pk_user = 1")
    finally:
        held.close()
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        names = d.execute("SELECT pk_post, data->'author'->>'name' FROM tv_post WHERE"
                          " fk_user = 1 ORDER BY pk_post").fetchall()
    assert names == [(1, "Alicia"), (2, "Alicia"), (200, "Alicia"), (201, "Alicia")]
    oracle(pg)


def test_a_whole_refresh_takes_one_lock_not_one_per_row(pg: Any, fixture_f: Any) -> None:
    """A TVIEW refreshed whole (its creation's diff refresh, an opaque write such as COPY) is
    locked as one, exclusively, not row by row: a lock per row of a big table would not fit
    PostgreSQL's lock table and the COMMIT would fail with 53200.  A prepared transaction keeps
    its advisory locks, so pg_locks shows what the refresh took."""
    n = 5000
    with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
        d.execute("DROP TABLE IF EXISTS tb_big CASCADE; CREATE TABLE tb_big (pk_big BIGINT"
                  " PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(), v INT NOT NULL)")
        d.execute("INSERT INTO tb_big (pk_big, v) SELECT g, g FROM generate_series(1, %s) g",
                  (n,))
    try:
        with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
            c.execute("CREATE TABLE tv_big AS SELECT pk_big, id, jsonb_build_object('v', v)"
                      " AS data FROM tb_big")
        with psycopg.connect(fixture_f.dsn("app")) as c:
            with c.cursor().copy("COPY tb_big (pk_big, v) FROM STDIN") as cp:
                cp.write_row((n + 1, 7))  # an opaque write: tv_big is refreshed whole
            c.execute("UPDATE tb_big SET v = v + 1 WHERE pk_big = 1")
            c.execute("PREPARE TRANSACTION 'big'")
        with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
            assert d.execute("SELECT array_agg(gid) FROM pg_prepared_xacts WHERE database ="
                             " current_database()").fetchone()[0] == ["big"]
            held = d.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND"
                             " pid IS NULL AND database = (SELECT oid FROM pg_database WHERE"
                             " datname = current_database())").fetchone()[0]  # prepared ones
            assert 0 < held < 10
        with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
            c.execute("COMMIT PREPARED 'big'")
        with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
            assert d.execute("SELECT data->>'v' FROM tv_big WHERE pk_big IN (1, %s)"
                             " ORDER BY pk_big", (n + 1,)).fetchall() == [("2",), ("7",)]
        oracle(pg, entities=("company", "user", "post", "big"))
    finally:
        tview_fixture.rollback_prepared(pg)
        with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
            c.execute("DROP TABLE IF EXISTS tv_big")
        with psycopg.connect(pg.dsn("app"), autocommit=True) as d:
            d.execute("DROP TABLE IF EXISTS tb_big CASCADE")
