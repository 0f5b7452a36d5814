"""Refresh plans executed on a real PostgreSQL (fixture F of the TVIEW scenarios, no proxy yet):
after each transaction every tv_ table equals its view (the oracle)."""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg
import pytest
from tview_fixture import base_ddl, direct_tviews_ddl

from tvproxy.tview.analyze import TviewError
from tvproxy.tview.catalog import ensure_touch
from tvproxy.tview.planner import TviewSpec, affected, plan_refresh

FIXTURE = base_ddl("pl") + direct_tviews_ddl()  # fixture F in schema pl, no proxy

SPECS = {
    "company": TviewSpec("company", "tv_company", "v_company", "pk_company", "bigint",
                         ("pk_company", "id", "data"), (), "pl"),
    "user": TviewSpec("user", "tv_user", "v_user", "pk_user", "bigint",
                      ("pk_user", "id", "fk_company", "company_id", "data"),
                      (("fk_company", "company"),), "pl"),
    "post": TviewSpec("post", "tv_post", "v_post", "pk_post", "bigint",
                      ("pk_post", "id", "fk_user", "user_id", "data"), (("fk_user", "user"),), "pl"),
}
ORDER = ["company", "user", "post"]
TYPES = {e: "bigint" for e in ("company", "user", "post", "comment")}


@pytest.fixture(params=["general", "one-key"])
def specs(request: Any) -> dict[str, TviewSpec]:
    """The specs with and without the catalog's touch function: without it the gate always
    takes its general form; with it, a plan of one key per TVIEW takes the one-key form."""
    if request.param == "general":
        return SPECS
    return {e: dataclasses.replace(s, touch='"pl".touch_row') for e, s in SPECS.items()}


@pytest.fixture
async def conn(pg: Any) -> Any:
    c = await asyncpg.connect(pg.url("app"))
    await c.execute("DROP SCHEMA IF EXISTS pl CASCADE")
    async with c.transaction():
        await c.execute(FIXTURE)
        await ensure_touch(c, "pl")
    yield c
    await c.execute("DROP SCHEMA IF EXISTS pl CASCADE")
    await c.close()


async def run(conn: Any, specs: Any, writes: str, touched: dict[str, set[int]]) -> dict[str, tuple[int, int]]:
    """Apply ``writes`` and the plan for ``touched`` in one transaction; (upserted, deleted)."""
    counts: dict[str, tuple[int, int]] = {}
    async with conn.transaction():
        await conn.execute(writes)
        plan = plan_refresh(specs, ORDER, touched, TYPES, 0x7476)
        assert plan is not None
        first = plan.first_refresh
        assert first in (0, 1, 2) and len(plan.statements) == first + len(plan.entities)
        for sql, params in zip(plan.statements[:first], plan.params[:first], strict=True):
            await conn.fetch(sql, *params)
        for entity, sql, params in zip(plan.entities, plan.statements[first:],
                                       plan.params[first:], strict=True):
            row = await conn.fetchrow(sql, *params)
            counts[entity] = (row["upserted"], row["deleted"])
    await _assert_fresh(conn)
    return counts


async def test_refresh_statements_settle_on_generic_plans(specs: Any, conn: Any) -> None:
    """No statement of a plan is planned again at every execution: after PostgreSQL's five
    custom plans each one runs from its generic plan, with the client's plan_cache_mode left
    as it is (auto)."""
    for i in range(9):
        counts = await run(conn, specs, f"UPDATE pl.tb_post SET title = 'T{i}' WHERE pk_post = "
                                        f"{1 + i % 3}", {"post": {1 + i % 3}})
        assert counts["post"] == (1, 0)
    rows = await conn.fetch("SELECT statement, generic_plans, custom_plans FROM "
                            "pg_prepared_statements WHERE (statement LIKE '%pg_advisory%' OR "
                            "statement LIKE 'WITH %INSERT INTO \"pl\".\"tv_post\"%') AND "
                            "statement NOT LIKE '%pg_prep%'")
    assert len(rows) == 2  # the gate, the refresh of tv_post
    for r in rows:
        assert r["custom_plans"] <= 5 and r["generic_plans"] >= 4, r["statement"][:60]
    assert await conn.fetchval("SELECT current_setting('plan_cache_mode')") == "auto"


async def _assert_fresh(conn: Any) -> None:
    """The oracle: every tv_ table equals its view."""
    for e in ORDER:
        drift = await conn.fetchval(
            f"SELECT count(*) FROM ((TABLE pl.tv_{e} EXCEPT TABLE pl.v_{e}) UNION ALL "
            f"(TABLE pl.v_{e} EXCEPT TABLE pl.tv_{e})) d")
        assert drift == 0, f"tv_{e} drifted from v_{e}"


async def _waiting_for_advisory_lock(conn: Any, other: Any) -> None:
    """Until ``other``'s backend waits for an advisory lock."""
    import asyncio

    pid = other.get_server_pid()
    for _ in range(1000):
        if await conn.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted"
                               " AND locktype = 'advisory'", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the other transaction never waited")


async def test_scalar_update_refreshes_one_row(specs: Any, conn: Any) -> None:
    counts = await run(conn, specs, "UPDATE pl.tb_post SET title = 'P1b' WHERE pk_post = 1", {"post": {1}})
    assert counts == {"post": (1, 0)}


async def test_cascades_follow_embedding(specs: Any, conn: Any) -> None:
    counts = await run(conn, specs, "UPDATE pl.tb_user SET name = 'Alicia' WHERE pk_user = 1",
                       {"user": {1}})
    assert counts == {"user": (1, 0), "post": (2, 0)}  # posts 1 and 2, not 3
    counts = await run(conn, specs, "UPDATE pl.tb_company SET name = 'Acme Corp' WHERE pk_company = 1",
                       {"company": {1}})
    assert counts == {"company": (1, 0), "user": (2, 0), "post": (3, 0)}  # R(user,3)=0


async def test_insert_delete_move_and_aggregation(specs: Any, conn: Any) -> None:
    await run(conn, specs, "INSERT INTO pl.tb_post VALUES (4, DEFAULT, 3, 'P4')",
              {"post": {4}})
    assert await conn.fetchval("SELECT data->'author'->'company'->>'name' FROM pl.tv_post "
                               "WHERE pk_post = 4") == "Globex"
    # comments are aggregated into their post: the comment's fk_post is the touched post key
    counts = await run(conn, specs, "INSERT INTO pl.tb_comment VALUES (3, DEFAULT, 2, 'c3')",
                       {"comment": {3}, "post": {2}})
    assert counts == {"post": (1, 0)}
    counts = await run(conn, specs, "UPDATE pl.tb_post SET fk_user = 3 WHERE pk_post = 1",
                       {"post": {1}})
    assert counts == {"post": (1, 0)}
    counts = await run(conn, specs, "DELETE FROM pl.tb_comment WHERE fk_post = 1; "
                             "DELETE FROM pl.tb_post WHERE pk_post = 1",
                       {"comment": {1, 2}, "post": {1}})
    assert counts == {"post": (0, 1)}
    counts = await run(conn, specs, "UPDATE pl.tb_post SET title = title WHERE pk_post = 2", {"post": {2}})
    assert counts == {"post": (0, 0)}  # unchanged rows are skipped


@pytest.mark.parametrize("isolation", ["read_committed", "repeatable_read"])
async def test_key_sets_take_the_general_gate(specs: Any, conn: Any, isolation: str) -> None:
    """Two posts at once: the general gate (sets of keys), with the parents' no-op UPDATEs
    under REPEATABLE READ (through the catalog's function when there is one)."""
    await conn.execute(f"SET default_transaction_isolation = '{isolation.replace('_', ' ')}'")
    try:
        counts = await run(conn, specs, "UPDATE pl.tb_post SET title = title || '!' WHERE "
                                        "pk_post IN (1, 3)", {"post": {1, 3}})
    finally:
        await conn.execute("RESET default_transaction_isolation")
    assert counts == {"post": (2, 0)}


def test_nothing_affected_and_depth_limit() -> None:
    assert plan_refresh(SPECS, ORDER, {"comment": {1}}, TYPES, 1) is None
    assert affected(SPECS, {"company"}) == {"company": 0, "user": 1, "post": 2}
    with pytest.raises(TviewError) as err:
        affected(SPECS, {"company"}, max_depth=1)
    assert err.value.sqlstate == "54001"


async def test_gate_orders_refreshes_that_meet_in_a_row_one_cannot_see(specs: Any, pg: Any,
                                                                      conn: Any) -> None:
    """T1 inserts a post under user 3 while T2 renames user 3: T2's key sets cannot contain the
    post before T1 commits, T1's refresh cannot see the new name before T2 commits.  The gate
    (both lock user 3 before computing anything) makes the second wait for the first."""
    import asyncio

    other = await asyncpg.connect(pg.url("app"))
    try:
        t1 = conn.transaction()
        await t1.start()
        await conn.execute("INSERT INTO pl.tb_post VALUES (4, DEFAULT, 3, 'P4')")
        plan1 = plan_refresh(specs, ORDER, {"post": {4}}, TYPES, 0x7476)
        assert plan1 is not None and plan1.first_refresh == 1  # gate, refresh tv_post
        for sql, params in zip(plan1.statements[:1], plan1.params[:1], strict=True):
            await conn.fetch(sql, *params)  # the gate: post 4, and user 3 it reads (shared)

        async def rename() -> None:
            async with other.transaction():
                await other.execute("UPDATE pl.tb_user SET name = 'Zed' WHERE pk_user = 3")
                plan2 = plan_refresh(specs, ORDER, {"user": {3}}, TYPES, 0x7476)
                assert plan2 is not None
                for sql, params in zip(plan2.statements, plan2.params, strict=True):
                    await other.fetch(sql, *params)

        task = asyncio.ensure_future(rename())
        await _waiting_for_advisory_lock(conn, other)  # at its gate, for T1
        assert not task.done()
        for sql, params in zip(plan1.statements[1:], plan1.params[1:], strict=True):
            await conn.fetch(sql, *params)
        await t1.commit()
        await asyncio.wait_for(task, 10)
        assert await conn.fetchval("SELECT data->'author'->>'name' FROM pl.tv_post WHERE "
                                   "pk_post = 4") == "Zed"
        await _assert_fresh(conn)
    finally:
        await other.close()


async def test_retitle_and_rename_of_its_author_meet_at_the_author(specs: Any, pg: Any, conn: Any) -> None:
    """T1 retitles post 1 (its author stays): its gate locks post 1 exclusive and its author and
    the author's company shared (under READ COMMITTED nothing is written for that).  T2
    renames user 1 meanwhile: it waits at its gate, so post 1 ends with the new title and the
    new name."""
    import asyncio

    other = await asyncpg.connect(pg.url("app"))
    try:
        t1 = conn.transaction()
        await t1.start()
        await conn.execute("UPDATE pl.tb_post SET title = 'P1 retitled' WHERE pk_post = 1")
        plan1 = plan_refresh(specs, ORDER, {"post": {1}}, TYPES, 0x7476)
        assert plan1 is not None and plan1.first_refresh == 1  # gate, refresh
        for sql, params in zip(plan1.statements[:1], plan1.params[:1], strict=True):
            await conn.fetch(sql, *params)
        held = await conn.fetch("SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND "
                                "locktype = 'advisory'")
        assert sorted(r["mode"] for r in held) == ["ExclusiveLock", "ShareLock", "ShareLock",
                                                   "ShareLock"]  # post, user, company, TVIEW
        assert await conn.fetchval("SELECT current_setting('plan_cache_mode')") == "auto"

        async def rename() -> None:
            async with other.transaction():
                await other.execute("UPDATE pl.tb_user SET name = 'Alicia' WHERE pk_user = 1")
                plan2 = plan_refresh(specs, ORDER, {"user": {1}}, TYPES, 0x7476)
                assert plan2 is not None
                for sql, params in zip(plan2.statements, plan2.params, strict=True):
                    await other.fetch(sql, *params)

        task = asyncio.ensure_future(rename())
        await _waiting_for_advisory_lock(conn, other)  # at its gate, for user 1
        assert not task.done()
        for sql, params in zip(plan1.statements[1:], plan1.params[1:], strict=True):
            await conn.fetch(sql, *params)
        await t1.commit()
        await asyncio.wait_for(task, 10)
        row = await conn.fetchrow("SELECT data->>'title' AS t, data->'author'->>'name' AS a "
                                  "FROM pl.tv_post WHERE pk_post = 1")
        assert (row["t"], row["a"]) == ("P1 retitled", "Alicia")
        await _assert_fresh(conn)
    finally:
        await other.close()


async def test_rewritten_row_under_repeatable_read_fails_at_the_upsert(specs: Any, pg: Any,
                                                                     conn: Any) -> None:
    """T1 (REPEATABLE READ) retitles post 1; T2 renames user 1, refreshes post 1 and commits
    after T1's snapshot.  T1's gate gives post 1 no no-op UPDATE any more: the refresh's
    upsert meets T2's row version and fails with 40001, nothing goes stale."""
    other = await asyncpg.connect(pg.url("app"))
    try:
        t1 = conn.transaction(isolation="repeatable_read")
        await t1.start()
        await conn.execute("UPDATE pl.tb_post SET title = 'P1 retitled' WHERE pk_post = 1")
        async with other.transaction():
            await other.execute("UPDATE pl.tb_user SET name = 'Alicia' WHERE pk_user = 1")
            plan2 = plan_refresh(specs, ORDER, {"user": {1}}, TYPES, 0x7476)
            assert plan2 is not None
            for sql, params in zip(plan2.statements, plan2.params, strict=True):
                await other.fetch(sql, *params)
        plan1 = plan_refresh(specs, ORDER, {"post": {1}}, TYPES, 0x7476)
        assert plan1 is not None
        with pytest.raises(asyncpg.SerializationError):
            for sql, params in zip(plan1.statements, plan1.params, strict=True):
                await conn.fetch(sql, *params)
        await t1.rollback()
        await _assert_fresh(conn)
    finally:
        await other.close()


async def test_gate_under_repeatable_read_fails_the_later_transaction(specs: Any, pg: Any,
                                                                      conn: Any) -> None:
    """The same meeting under REPEATABLE READ: the second cannot see the first's writes in
    its snapshot, so it fails with 40001 (its client retries) instead of going stale."""
    import asyncio

    other = await asyncpg.connect(pg.url("app"))
    try:
        t1 = conn.transaction(isolation="repeatable_read")
        await t1.start()
        await conn.execute("INSERT INTO pl.tb_post VALUES (4, DEFAULT, 3, 'P4')")
        plan1 = plan_refresh(specs, ORDER, {"post": {4}}, TYPES, 0x7476)
        assert plan1 is not None
        for sql, params in zip(plan1.statements[:1], plan1.params[:1], strict=True):
            await conn.fetch(sql, *params)

        async def rename() -> None:
            async with other.transaction(isolation="repeatable_read"):
                await other.execute("UPDATE pl.tb_user SET name = 'Zed' WHERE pk_user = 3")
                plan2 = plan_refresh(specs, ORDER, {"user": {3}}, TYPES, 0x7476)
                assert plan2 is not None
                for sql, params in zip(plan2.statements, plan2.params, strict=True):
                    await other.fetch(sql, *params)

        task = asyncio.ensure_future(rename())
        await _waiting_for_advisory_lock(conn, other)
        assert not task.done()
        for sql, params in zip(plan1.statements[1:], plan1.params[1:], strict=True):
            await conn.fetch(sql, *params)
        await t1.commit()
        with pytest.raises(asyncpg.SerializationError):
            await asyncio.wait_for(task, 10)
        await _assert_fresh(conn)
    finally:
        await other.close()
