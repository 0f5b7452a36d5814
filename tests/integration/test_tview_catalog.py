"""The TVIEW catalog on a real PostgreSQL: idempotent creation (also concurrent), rows, NOTIFY."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tvproxy.tview.catalog import (
    CatalogEntry,
    delete_entry,
    ensure_catalog,
    load_catalog,
    notify_channel,
    save_entry,
)

SCHEMA = "tvproxy_catalog_test"


class _RollBack(Exception):
    pass


async def test_catalog_lifecycle(pg: Any) -> None:
    a = await asyncpg.connect(pg.url("app"))
    b = await asyncpg.connect(pg.url("app"))
    listener = await asyncpg.connect(pg.url("app"))
    try:
        await a.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        assert await load_catalog(a, SCHEMA) == []
        # two instances creating the catalog at the same time do not collide
        await asyncio.gather(ensure_catalog(a, SCHEMA, 0x7476), ensure_catalog(b, SCHEMA, 0x7476))
        await ensure_catalog(a, SCHEMA, 0x7476)
        heard: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener(notify_channel(SCHEMA), lambda *args: heard.put_nowait(args[3]))
        entry = CatalogEntry("post", "tv_post", "v_post", "pk_post", "bigint",
                             "SELECT 1", ("tb_post", "tb_comment"), ("user",),
                             {"tb_comment": {"rule": "aggregation", "fk": "fk_post"}})
        async with a.transaction():
            await save_entry(a, SCHEMA, entry)
            assert heard.empty()  # announced only when the transaction commits
        assert await asyncio.wait_for(heard.get(), 5) == "post"
        (loaded,) = await load_catalog(b, SCHEMA)
        assert loaded.sources == ("tb_post", "tb_comment") and loaded.depends_on == ("user",)
        assert loaded.key_mapping["tb_comment"]["rule"] == "aggregation"
        assert loaded.strategy == "incremental" and loaded.created_at is not None
        try:
            await save_entry(a, SCHEMA, entry)
            raise AssertionError("a second TVIEW with the same entity was accepted")
        except asyncpg.UniqueViolationError as exc:
            assert exc.sqlstate == "23505"
        assert await delete_entry(a, SCHEMA, "post")
        assert not await delete_entry(a, SCHEMA, "post")
        assert await load_catalog(a, SCHEMA) == []
    finally:
        await a.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        for conn in (a, b, listener):
            await conn.close()


async def test_view_sources_through_nested_views(pg: Any) -> None:
    from tvproxy.tview.catalog import view_sources

    conn = await asyncpg.connect(pg.url("app"))
    try:
        async with conn.transaction():
            await conn.execute("""
                CREATE TABLE vs_company (pk_company bigint PRIMARY KEY, name text);
                CREATE TABLE vs_user (pk_user bigint PRIMARY KEY,
                                      fk_company bigint REFERENCES vs_company, name text);
                CREATE TABLE vs_post (pk_post bigint PRIMARY KEY,
                                      fk_user bigint REFERENCES vs_user, title text);
                CREATE TABLE vs_comment (pk_comment bigint PRIMARY KEY,
                                         fk_post bigint REFERENCES vs_post, text text);
                CREATE VIEW vs_v_company AS SELECT pk_company, name FROM vs_company;
                CREATE VIEW vs_v_user AS SELECT u.pk_user, u.fk_company, c.name AS company
                  FROM vs_user u JOIN vs_v_company c ON c.pk_company = u.fk_company;
                CREATE VIEW vs_v_post AS SELECT p.pk_post, p.fk_user, u.company,
                  (SELECT count(*) FROM vs_comment c WHERE c.fk_post = p.pk_post) AS comments
                  FROM vs_post p JOIN vs_v_user u ON u.pk_user = p.fk_user;
            """)
            got = {(s.name, s.kind, s.depth) for s in await view_sources(conn, "vs_v_post")}
            assert got == {
                ("vs_post", "table", 1), ("vs_comment", "table", 1), ("vs_v_user", "view", 1),
                ("vs_user", "table", 2), ("vs_v_company", "view", 2), ("vs_company", "table", 3),
            }
            raise _RollBack  # leave no test objects behind
    except _RollBack:
        pass
    finally:
        await conn.close()
