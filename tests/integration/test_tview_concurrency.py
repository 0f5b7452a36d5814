"""Concurrent random transactions through the proxy (asyncpg, prepared statements): updates,
inserts, deletes across fixture F, savepoints, rollbacks and forced errors.  Afterwards every
TVIEW equals its view and every committed base write is present."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
import tview_fixture
from tview_fixture import drift

fixture_f = tview_fixture.fixture_f

CLIENTS = 8
TRANSACTIONS = 300


async def _client(url: str, n: int, isolation: str, committed: dict[int, str]) -> int:
    rng = random.Random(n)
    conn = await asyncpg.connect(url)
    retries = 0
    try:
        for i in range(TRANSACTIONS):
            title = f"c{n}-t{i}"
            pk = 1000 + n * TRANSACTIONS + i
            while True:
                try:
                    async with conn.transaction(isolation=isolation):
                        await conn.execute("UPDATE tb_user SET name = $1 WHERE pk_user = $2",
                                           f"u{n}-{i}", rng.randint(1, 3))
                        await conn.execute("INSERT INTO tb_post VALUES ($1, DEFAULT, $2, $3)",
                                           pk, rng.randint(1, 3), title)
                        if rng.random() < 0.3:
                            tr = conn.transaction()
                            await tr.start()
                            await conn.execute("UPDATE tb_company SET name = $1 WHERE "
                                               "pk_company = $2", f"co{n}-{i}", rng.randint(1, 2))
                            if rng.random() < 0.5:
                                await tr.rollback()
                            else:
                                await tr.commit()
                        if rng.random() < 0.2:
                            await conn.execute("INSERT INTO tb_comment VALUES ($1, DEFAULT, $2, 'x')",
                                               pk, pk)
                        if rng.random() < 0.1:
                            await conn.execute("DELETE FROM tb_comment WHERE pk_comment = $1", pk)
                        if rng.random() < 0.1:
                            await conn.execute("SELECT 1/0")  # forced error: rolls back
                    committed[pk] = title
                    break
                except asyncpg.SerializationError:
                    retries += 1
                    continue
                except asyncpg.DivisionByZeroError:
                    break
    finally:
        await conn.close()
    return retries


@pytest.mark.parametrize("isolation", ["read_committed", "repeatable_read"])
async def test_concurrent_random_transactions(pg: Any, fixture_f: Any, isolation: str) -> None:
    committed: dict[int, str] = {}
    await asyncio.gather(*(_client(fixture_f.url("app"), n, isolation, committed)
                           for n in range(CLIENTS)))
    assert drift(pg) == {"company": 0, "user": 0, "post": 0}
    direct = await asyncpg.connect(pg.url("app"))
    try:
        rows = dict(await direct.fetch("SELECT pk_post, title FROM tb_post WHERE pk_post >= 1000"))
        assert rows == committed
        tv = await direct.fetchval("SELECT count(*) FROM tv_post WHERE pk_post >= 1000")
        assert tv == len(committed)
    finally:
        await direct.close()
