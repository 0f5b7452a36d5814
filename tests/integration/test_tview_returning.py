"""Writes whose keys the statement does not name (scenario 23) through a real tvproxy: the
proxy appends RETURNING key columns and strips them from the reply.  The client must see
exactly what PostgreSQL returns for its own statement, the oracle must hold after every COMMIT,
and only the rows written are refreshed (SHOW TVIEW STATS), not every row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest
import tview_fixture

fixture_f = tview_fixture.fixture_f
oracle = tview_fixture.oracle

# (statement with {p} placeholders, parameters): scenario 23 and its relatives
STATEMENTS = [
    ("UPDATE tb_post SET title = title || {p} WHERE title LIKE {p}", ("!", "P%")),
    ("UPDATE tb_post SET title = title || {p} WHERE title LIKE {p} RETURNING pk_post, title",
     ("?", "P%")),
    ("INSERT INTO tb_post SELECT {p}::bigint + pk_post, gen_random_uuid(), fk_user, title "
     "FROM tb_post", (10,)),
    ("INSERT INTO tb_post SELECT {p}::bigint + pk_post, gen_random_uuid(), fk_user, title "
     "FROM tb_post WHERE pk_post < 10 RETURNING fk_user, title, pk_post", (20,)),
    ("INSERT INTO tb_post (pk_post, fk_user, title) SELECT pk_post, 3, {p} FROM tb_post "
     "WHERE pk_post <= 2 ON CONFLICT (pk_post) DO UPDATE SET title = excluded.title, "
     "fk_user = excluded.fk_user RETURNING pk_post, fk_user", ("up",)),
    ("UPDATE tb_comment SET fk_post = {p} WHERE text = {p} RETURNING pk_comment, fk_post",
     (2, "c2")),
    ("DELETE FROM tb_comment WHERE text = {p}", ("c1",)),
    ("UPDATE tb_post p SET pk_post = pk_post + {p} WHERE title LIKE {p}", (100, "P3%")),
    ("UPDATE tb_user u SET name = u.name || {p} FROM tb_company c WHERE c.pk_company = "
     "u.fk_company AND c.name = {p} RETURNING u.pk_user, c.name", ("+", "Acme")),
    ("DELETE FROM tb_post WHERE title LIKE {p} RETURNING *", ("%0",)),
]
DETERMINISTIC = ("pk_post", "title", "fk_user", "pk_comment", "fk_post", "pk_user", "name")


def sql_for(template: str, style: str) -> str:
    """``{p}`` as psycopg's ``%s`` or asyncpg's ``$n``."""
    if style == "psycopg":
        return template.replace("{p}", "%s")
    parts = template.split("{p}")
    return "".join(part + (f"${i + 1}" if i + 1 < len(parts) else "")
                   for i, part in enumerate(parts))


def result(cur: psycopg.Cursor) -> tuple[Any, ...]:
    desc = None if cur.description is None else [(d.name, d.type_code) for d in cur.description]
    rows = None
    if desc is not None:
        keep = [i for i, (name, _) in enumerate(desc) if name in DETERMINISTIC]
        rows = sorted(tuple(r[i] for i in keep) for r in cur.fetchall())
    return cur.rowcount, cur.statusmessage, desc, rows


def run_psycopg(dsn: str, mode: str, sql: str, params: tuple[Any, ...],
                commit: bool) -> tuple[Any, ...]:
    with psycopg.connect(dsn) as c:
        if mode == "simple":
            cur: Any = psycopg.ClientCursor(c)
            cur.execute(sql, params)
        elif mode == "binary":
            cur = c.cursor(binary=True)
            cur.execute(sql, params)
        else:
            cur = c.cursor()
            cur.execute(sql, params, prepare=mode == "prepared")
        got = result(cur)
        if commit:
            c.commit()
        else:
            c.rollback()
    return got


def stats(proxy: Any) -> dict[str, dict[str, Any]]:
    with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as c:
        cur = c.execute("SHOW TVIEW STATS")
        names = [d.name for d in cur.description]
        return {r[1]: dict(zip(names, r, strict=True)) for r in cur.fetchall() if r[0] == "app"}


def delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], tview: str,
          field: str) -> int:
    return after[tview][field] - before[tview][field]


@pytest.mark.parametrize("mode", ["simple", "extended", "binary", "prepared"])
def test_psycopg_sees_what_postgresql_returns(pg: Any, fixture_f: Any, mode: str) -> None:
    for template, params in STATEMENTS:
        sql = sql_for(template, "psycopg")
        want = run_psycopg(pg.dsn("app"), mode, sql, params, commit=False)
        got = run_psycopg(fixture_f.dsn("app"), mode, sql, params, commit=True)
        assert got == want, sql
        oracle(pg)


def test_psycopg_autocommit_and_description(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        cur = c.execute("UPDATE tb_post SET title = title || '!' WHERE title LIKE 'P%'")
        assert cur.description is None and cur.rowcount == 3
        assert cur.statusmessage == "UPDATE 3"
        oracle(pg)
        cur = c.execute("UPDATE tb_post SET title = title || %s WHERE title LIKE %s "
                        "RETURNING title", ("!", "P%"))
        assert [d.name for d in cur.description] == ["title"]
        assert sorted(cur.fetchall()) == [("P1!!",), ("P2!!",), ("P3!!",)]
        oracle(pg)
        cur = c.execute("INSERT INTO tb_post SELECT 10+pk_post, gen_random_uuid(), fk_user, title"
                        " FROM tb_post")
        assert cur.description is None and cur.statusmessage == "INSERT 0 3"
        oracle(pg)


async def test_asyncpg_sees_what_postgresql_returns(pg: Any, fixture_f: Any) -> None:
    direct = await asyncpg.connect(pg.url("app"))
    proxied = await asyncpg.connect(fixture_f.url("app"))
    try:
        for template, params in STATEMENTS:
            sql = sql_for(template, "asyncpg")
            for conn, keep in ((direct, False), (proxied, True)):
                tr = conn.transaction()
                await tr.start()
                stmt = await conn.prepare(sql)
                cols = [(a.name, a.type.oid) for a in stmt.get_attributes()]
                rows = sorted(tuple(v for k, v in r.items() if k in DETERMINISTIC)
                              for r in await stmt.fetch(*params))
                status = stmt.get_statusmsg()
                await (tr.commit() if keep else tr.rollback())
                if not keep:
                    want = (cols, rows, status)
            assert (cols, rows, status) == want, sql
            oracle(pg)
        # asyncpg's execute: simple protocol without arguments, a prepared statement with them
        n = await direct.fetchval("SELECT count(*) FROM tb_post WHERE title LIKE 'P%'")
        assert await proxied.execute("UPDATE tb_post SET title = title || '!' WHERE title "
                                     "LIKE 'P%'") == f"UPDATE {n}"
        oracle(pg)
        assert await proxied.execute("DELETE FROM tb_comment WHERE text = $1", "c2") == "DELETE 1"
        oracle(pg)
        row = await proxied.fetchrow("UPDATE tb_post SET title = $1 WHERE title LIKE $2 "
                                     "RETURNING title", "T", "P1%")
        assert dict(row) == {"title": "T"}
        oracle(pg)
    finally:
        await direct.close()
        await proxied.close()


async def test_asyncpg_prepared_statement_on_another_server(pg: Any, fixture_f: Any) -> None:
    """The rewritten statement is what each server prepares; the stripping follows the name."""
    conn = await asyncpg.connect(fixture_f.url("app"))
    other = await asyncpg.connect(fixture_f.url("app"))
    try:
        stmt = await conn.prepare("UPDATE tb_post SET title = title || $1 WHERE title LIKE $2 "
                                  "RETURNING pk_post, title")
        assert [a.name for a in stmt.get_attributes()] == ["pk_post", "title"]
        pids = []
        for suffix in ("!", "?"):
            async with conn.transaction():
                pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
                rows = await stmt.fetch(suffix, "P%")
            assert sorted(tuple(r) for r in rows) == [
                (i, f"P{i}!" + ("?" if suffix == "?" else "")) for i in (1, 2, 3)]
            oracle(pg)
            if suffix == "!":  # hold the server just used: the next run lands on another
                tr = other.transaction()
                await tr.start()
                await other.fetchval("SELECT 1")
        assert pids[0] != pids[1]
        await tr.rollback()
    finally:
        await conn.close()
        await other.close()


def test_only_the_written_rows_are_refreshed(pg: Any, fixture_f: Any) -> None:
    runs: list[Callable[[psycopg.Connection], Any]] = [
        lambda c: c.execute("UPDATE tb_post SET title = title || '!' WHERE pk_post < 3 AND "
                            "title LIKE 'P%'"),
        lambda c: c.execute("UPDATE tb_post SET title = title || %s WHERE pk_post < %s AND "
                            "title LIKE 'P%%'", ("!", 3)),
        lambda c: c.execute("UPDATE tb_post SET title = title || %s WHERE pk_post < %s AND "
                            "title LIKE 'P%%' RETURNING title", ("!", 3), prepare=True),
    ]
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        for run in runs:
            before = stats(fixture_f)
            run(c)
            oracle(pg)
            after = stats(fixture_f)
            assert delta(before, after, "tv_post", "keys_enqueued") == 2
            assert delta(before, after, "tv_post", "rows_refreshed") == 2
            assert delta(before, after, "tv_post", "refresh_statements") == 1
            assert delta(before, after, "tv_user", "refresh_statements") == 0
        before = stats(fixture_f)
        c.execute("DELETE FROM tb_comment WHERE text = 'c2'")  # old parent from RETURNING
        oracle(pg)
        after = stats(fixture_f)
        assert delta(before, after, "tv_post", "keys_enqueued") == 1
        before = stats(fixture_f)
        c.execute("INSERT INTO tb_post VALUES (4, DEFAULT, 3, 'P4')")  # no column list
        oracle(pg)
        assert delta(before, stats(fixture_f), "tv_post", "keys_enqueued") == 1


async def test_asyncpg_refreshes_only_the_written_rows(pg: Any, fixture_f: Any) -> None:
    conn = await asyncpg.connect(fixture_f.url("app"))
    try:
        for args in ((), ("!", 3)):
            before = stats(fixture_f)
            if args:
                await conn.execute("UPDATE tb_post SET title = title || $1 WHERE pk_post < $2 "
                                   "AND title LIKE 'P%'", *args)
            else:
                await conn.execute("UPDATE tb_post SET title = title || '!' WHERE pk_post < 3 "
                                   "AND title LIKE 'P%'")
            oracle(pg)
            after = stats(fixture_f)
            assert delta(before, after, "tv_post", "keys_enqueued") == 2
    finally:
        await conn.close()


def test_moving_children_refreshes_old_and_new_parents(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        before = stats(fixture_f)
        c.execute("UPDATE tb_comment SET fk_post = 3 WHERE text LIKE 'c%'")
        oracle(pg)
        got = c.execute("SELECT pk_post, jsonb_array_length(data->'comments') FROM tv_post "
                        "ORDER BY 1").fetchall()
        assert got == [(1, 0), (2, 0), (3, 2)]
        keys = delta(before, stats(fixture_f), "tv_post", "keys_enqueued")
        assert keys == (2 if pg.version >= 18 else 3)  # old parent 1, new parent 3 (or all)


def test_a_thousand_rows_one_refresh_statement(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        before = stats(fixture_f)
        cur = c.execute("INSERT INTO tb_post (pk_post, fk_user, title) SELECT g, 1 + g % 3, "
                        "'P' || g FROM generate_series(100, 1096) g")
        assert cur.rowcount == 997
        oracle(pg)
        mid = stats(fixture_f)
        assert delta(before, mid, "tv_post", "keys_enqueued") == 997
        cur = c.execute("UPDATE tb_post SET title = title || '!'")
        assert cur.rowcount == 1000 and cur.description is None
        oracle(pg)
        after = stats(fixture_f)
        assert delta(mid, after, "tv_post", "refresh_statements") == 1
        assert delta(mid, after, "tv_post", "rows_refreshed") == 1000
        assert delta(mid, after, "tv_post", "keys_enqueued") == 1000


def test_big_returned_rows_stream_through(pg: Any, fixture_f: Any) -> None:
    big = "x" * 300_000  # DataRows larger than the framer's streaming threshold
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        cur = c.execute("UPDATE tb_post SET title = %s || pk_post WHERE title LIKE 'P%%' "
                        "RETURNING title", (big,))
        assert sorted(r[0] for r in cur.fetchall()) == [big + str(i) for i in (1, 2, 3)]
        oracle(pg)


def test_pipelined_commit_before_the_keys_arrive(pg: Any, fixture_f: Any) -> None:
    """COMMIT sent while the rewritten statement's rows are still on their way: that plan
    counts its keys as unknown (never misses them)."""
    with psycopg.connect(fixture_f.dsn("app")) as c:
        with c.pipeline():
            c.execute("UPDATE tb_post SET title = title || %s WHERE title LIKE %s", ("!", "P1%"))
            c.execute("INSERT INTO tb_post SELECT 10 + pk_post, gen_random_uuid(), fk_user, "
                      "title FROM tb_post WHERE pk_post = %s", (2,))
            c.commit()
        oracle(pg)
        with c.pipeline():
            c.execute("UPDATE tb_post SET title = %s WHERE title LIKE %s", ("s", "P2%"))
            c.execute("SAVEPOINT s")
            c.execute("UPDATE tb_post SET title = %s WHERE title LIKE %s", ("gone", "P3%"))
            c.execute("ROLLBACK TO s")
            cur = c.execute("SELECT data->>'title' FROM tv_post WHERE pk_post = 2")
            c.commit()
        assert cur.fetchone() == ("s",)  # read your writes
        oracle(pg)
        assert c.execute("SELECT title FROM tb_post WHERE pk_post = 3").fetchone() == ("P3",)


async def test_asyncpg_pipelined_executemany(pg: Any, fixture_f: Any) -> None:
    conn = await asyncpg.connect(fixture_f.url("app"))
    try:
        await conn.executemany("UPDATE tb_post SET title = title || $1 WHERE title LIKE $2",
                               [("!", "P1%"), ("?", "P2%"), ("#", "nothing%")])
        oracle(pg)
        async with conn.transaction():
            await conn.executemany("DELETE FROM tb_comment WHERE text = $1", [("c1",), ("c2",)])
        oracle(pg)
    finally:
        await conn.close()


def test_failed_rewritten_statement(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            c.execute("UPDATE tb_post SET fk_user = fk_user + 10 WHERE title LIKE 'P%'")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO tb_post SELECT * FROM tb_post")
        oracle(pg)
        c.execute("UPDATE tb_post SET title = 'ok' WHERE title LIKE 'P1%'")
        oracle(pg)
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("UPDATE tb_post SET title = 'tx' WHERE title LIKE 'ok%'")
        c.execute("SAVEPOINT a")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO tb_post SELECT * FROM tb_post")
        c.execute("ROLLBACK TO a")
        c.execute("UPDATE tb_post SET title = 'tx2' WHERE title LIKE 'P2%'")
        c.commit()
        oracle(pg)


def test_pipelined_commit_before_old_parents_arrive(pg: Any, fixture_f: Any) -> None:
    """Known keys whose old parents come back later (a pre-image before PostgreSQL 18, the
    appended RETURNING on 18): a COMMIT pipelined behind them still refreshes those parents."""
    with psycopg.connect(fixture_f.dsn("app")) as c:
        with c.pipeline():
            c.execute("DELETE FROM tb_comment WHERE pk_comment = %s", (1,))
            c.execute("UPDATE tb_comment SET fk_post = %s WHERE pk_comment = %s", (3, 2))
            c.commit()
        oracle(pg)


def test_upserts_that_move_rows(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        c.execute("INSERT INTO tb_comment (pk_comment, fk_post, text) VALUES (1, 2, 'x') "
                  "ON CONFLICT (pk_comment) DO UPDATE SET fk_post = excluded.fk_post")
        oracle(pg)  # the old parent lost its comment
        c.execute("INSERT INTO tb_comment (pk_comment, fk_post, text) VALUES (%s, 3, 'y') "
                  "ON CONFLICT (pk_comment) DO UPDATE SET fk_post = excluded.fk_post", (2,))
        oracle(pg)
        c.execute("INSERT INTO tb_post (pk_post, fk_user, title) VALUES (1, 2, 'z') "
                  "ON CONFLICT (pk_post) DO UPDATE SET pk_post = 30")
        oracle(pg)  # the new pk is not in the statement
        c.execute("INSERT INTO tb_comment (pk_comment, fk_post, text) SELECT pk_comment, 2, 'w' "
                  "FROM tb_comment ON CONFLICT (pk_comment) DO UPDATE SET fk_post = 30")
        oracle(pg)


def test_statement_prepared_by_another_client(pg: Any, fixture_f: Any) -> None:
    """A Parse the proxy could answer without a server (the statement is known) still goes
    through the engine when it writes a tracked table."""
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as a, \
            psycopg.connect(fixture_f.dsn("app"), autocommit=True) as b:
        for conn, title in ((a, "A"), (b, "B")):
            conn.execute("UPDATE tb_post SET title = %s WHERE pk_post = %s", (title, 1),
                         prepare=True)
            oracle(pg)
            conn.execute("UPDATE tb_post SET title = title || %s WHERE title LIKE %s",
                         (title, "P%"), prepare=True)
            oracle(pg)


async def test_asyncpg_cursor_leaves_rows_unread(pg: Any, fixture_f: Any) -> None:
    """A portal read with a row limit: the statement ran to completion, the keys of the rows
    never fetched are unknown, so its TVIEWs are refreshed fully."""
    conn = await asyncpg.connect(fixture_f.url("app"))
    try:
        async with conn.transaction():
            cur = await conn.cursor("UPDATE tb_post SET title = title || '!' WHERE title LIKE "
                                    "'P%' RETURNING pk_post, title")
            first = await cur.fetch(1)
            assert len(first) == 1 and first[0]["title"].endswith("!")
        oracle(pg)
        async with conn.transaction():
            got = [r async for r in conn.cursor("DELETE FROM tb_comment WHERE text LIKE 'c%' "
                                                "RETURNING pk_comment", prefetch=1)]
            assert sorted(r["pk_comment"] for r in got) == [1, 2]
        oracle(pg)
    finally:
        await conn.close()


def test_read_your_writes_after_a_rewritten_statement(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("UPDATE tb_user SET name = 'Z' WHERE name = 'Alice'")
        assert c.execute("SELECT data->>'name' FROM tv_user WHERE pk_user = 1").fetchone() == (
            "Z",)
        assert c.execute("SELECT data->'author'->>'name' FROM tv_post WHERE pk_post = 1"
                         ).fetchone() == ("Z",)
        c.execute("UPDATE tb_user SET name = name || '2' WHERE name = 'Z'")
        c.commit()
        oracle(pg)


@pytest.mark.parametrize("proxy_settings", [{"pool_mode": "session"},
                                            {"max_prepared_statements": 0}])
async def test_without_statement_mapping(pg: Any, fixture_f: Any, proxy_factory: Any,
                                         proxy_settings: dict[str, Any]) -> None:
    """Named statements go to the server as the client named them: rewritten text and all."""
    other = proxy_factory(proxy=proxy_settings, tview={"enabled": True})
    conn = await asyncpg.connect(other.url("app"))
    try:
        stmt = await conn.prepare("UPDATE tb_post SET title = title || $1 WHERE title LIKE $2 "
                                  "RETURNING title")
        assert [a.name for a in stmt.get_attributes()] == ["title"]
        assert sorted(r[0] for r in await stmt.fetch("!", "P%")) == ["P1!", "P2!", "P3!"]
        oracle(pg)
        assert await conn.execute("DELETE FROM tb_comment WHERE text = $1", "c1") == "DELETE 1"
        oracle(pg)
    finally:
        await conn.close()
    with psycopg.connect(other.dsn("app"), autocommit=True) as c:
        cur = c.execute("UPDATE tb_post SET title = %s WHERE title LIKE %s", ("t", "P1%"),
                        prepare=True)
        assert cur.description is None and cur.rowcount == 1
        oracle(pg)


# statements pglast prints back in its own way: the server must run the rewrite as the original
VARIED = [
    ('UPDATE tb_post SET title = CASE WHEN pk_post % 2 = 0 THEN upper(title) ELSE '
     "lower(title) END WHERE title ILIKE 'p%' ESCAPE '!'"),
    ("UPDATE tb_post SET title = substring(title from 1 for 1) || trim(both ' ' from '  x ') "
     "|| position('1' in title) WHERE title SIMILAR TO 'P_'"),
    ("UPDATE tb_post SET title = (now() AT TIME ZONE 'UTC')::date::text WHERE pk_post "
     'BETWEEN SYMMETRIC 3 AND 1'),
    ("UPDATE tb_post SET (title, fk_user) = (SELECT 'x' || u.name, u.pk_user FROM tb_user u "
     "WHERE u.pk_user = tb_post.fk_user) WHERE title IS DISTINCT FROM 'q'"),
    'UPDATE ONLY tb_post SET title = DEFAULT, id = DEFAULT WHERE false',
    ('UPDATE tb_post SET title = title COLLATE "C" WHERE title = ANY (ARRAY[\'P1\', \'P2\']) '
     'AND id IS NOT NULL'),
    ("UPDATE tb_post SET title = jsonb_build_object('a', 1)->>'a' WHERE (pk_post, fk_user) "
     'IN (SELECT pk_post, fk_user FROM tb_post) '),
    ("UPDATE tb_post SET title = extract(epoch FROM interval '1 day')::text || overlay('abc' "
     "placing 'x' from 2) WHERE EXISTS (SELECT 1 FROM tb_comment c WHERE c.fk_post = "
     'tb_post.pk_post)'),
    ("DELETE FROM tb_comment WHERE text LIKE 'c%' AND fk_post IN (SELECT pk_post FROM "
     "tb_post WHERE title = 'P1' FOR UPDATE)"),
    "DELETE FROM tb_post p USING tb_user u WHERE u.pk_user = p.fk_user AND u.name = 'Carol'",
    ('INSERT INTO tb_post (pk_post, fk_user, title) OVERRIDING USER VALUE SELECT g, 1, '
     "format('%s-%s', g, 'x') FROM generate_series(10, 12) g"),
    ("INSERT INTO tb_post (pk_post, fk_user, title) VALUES (1, 1, 'x'), (40, 1, 'y') ON "
     'CONFLICT ON CONSTRAINT tb_post_pkey DO UPDATE SET title = tb_post.title || '
     "excluded.title WHERE tb_post.title <> 'z'"),
    ("INSERT INTO tb_post AS p (pk_post, fk_user, title) VALUES (41, 1, E'a\\tb'), (42, 2, "
     "$$dollar'$$) ON CONFLICT (pk_post) DO NOTHING"),
    ('WITH RECURSIVE r(n) AS (SELECT 50 UNION ALL SELECT n + 1 FROM r WHERE n < 52) INSERT '
     "INTO tb_post (pk_post, fk_user, title) SELECT n, 1, 'r' FROM r"),
    ("UPDATE tb_post SET title = title || 'é€' WHERE title ~ '^P[0-9]+$' AND title !~* 'zz' "
     'AND length(title) >= 1'),
    ("UPDATE tb_post SET title = coalesce(nullif(title, ''), 'x') || greatest(1, 2)::text || "
     "row(1,2)::text WHERE pk_post = any('{1,2,3}'::bigint[]) IS TRUE"),
    ("UPDATE tb_post SET title = 'w' WHERE pk_post IN (SELECT pk_post FROM tb_post ORDER BY "
     'pk_post DESC NULLS LAST LIMIT 1 OFFSET 0)'),
    ("UPDATE tb_post SET title = (SELECT string_agg(name, ',' ORDER BY name) FILTER (WHERE "
     "name <> '') FROM tb_user) WHERE title LIKE 'P%'"),
    ('UPDATE tb_post SET title = (SELECT count(*) OVER (PARTITION BY fk_company ORDER BY '
     'pk_user ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM tb_user LIMIT 1)::text '
     "WHERE title LIKE 'P%'"),
    ('UPDATE tb_post SET title = current_user || session_user || current_timestamp::text || '
     "localtimestamp(2)::text WHERE title LIKE 'P%'"),
    ("UPDATE tb_post SET title = 'x' WHERE title IS NOT NULL AND title NOT IN ('a', 'b') AND "
     'NOT (pk_post < 0 OR pk_post > 100)'),
    ("UPDATE tb_post SET title = 'x'::varchar(3) || 1.5::numeric(4,2) || B'101'::text || "
     "x'1F'::int WHERE title LIKE 'P%'"),
]


def test_rewrites_run_as_the_originals(pg: Any, fixture_f: Any) -> None:
    from tvproxy.tview.capture import TrackedTable
    from tvproxy.tview.returning import rewrite_returning

    tables = {"tb_post": TrackedTable("tb_post", "post", "pk_post",
                                      frozenset({"pk_post", "fk_user"})),
              "tb_comment": TrackedTable("tb_comment", "comment", "pk_comment",
                                         frozenset({"pk_comment", "fk_post"}))}
    with psycopg.connect(pg.dsn("app")) as c:
        for sql in VARIED:
            target = "tb_comment" if sql.startswith("DELETE FROM tb_comment") else "tb_post"
            rw = rewrite_returning(sql, tables[target], (), pg.version >= 18)
            assert rw is not None, sql
            want = c.execute(sql).rowcount
            c.rollback()
            assert c.execute(rw.sql).rowcount == want, rw.sql
            c.rollback()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_autocommit_writes(pg: Any, fixture_f: Any, tmp_path: Any, mode: str) -> None:
    """pgbench clients preparing the same statements (the proxy knows them from another
    client): a known-key and a rewritten write, autocommit, every query mode."""
    import subprocess

    from tests.integration.test_pgbench import pgbench_path

    script = tmp_path / "w.sql"
    script.write_text("\\set x random(1, 3)\n"
                      "UPDATE tb_post SET title = 'k' || :x WHERE pk_post = :x;\n"
                      "UPDATE tb_post SET title = 'r' || :x WHERE pk_post <= :x;\n")
    cmd = [pgbench_path(pg), "-h", fixture_f.host, "-p", str(fixture_f.port), "-U", "postgres",
           "-n", "-M", mode, "-c", "4", "-T", "2", "--max-tries", "10", "-f", str(script),
           "app"]  # overlapping multi-row UPDATEs deadlock now and then on PostgreSQL itself
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "error" not in r.stderr, r.stdout + r.stderr
    assert "number of failed transactions: 0 " in r.stdout, r.stdout + fixture_f.logs()[-3000:]
    oracle(pg)
