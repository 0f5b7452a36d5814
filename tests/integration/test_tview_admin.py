"""The TVIEW admin commands (SHOW TVIEWS, SHOW TVIEW STATS, SHOW TVIEW QUEUE) through a real
tvproxy over fixture F."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import tview_fixture

fixture_f = tview_fixture.fixture_f  # fixture F with its three TVIEWs, created through the proxy


def admin(proxy: Any) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname="pgbouncer", user="postgres"), autocommit=True)


def show(conn: psycopg.Connection, what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def stats(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    return {r["tview"]: r for r in show(conn, "TVIEW STATS") if r["database"] == "app"}


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_show_tviews(fixture_f: Any) -> None:
    with admin(fixture_f) as conn:
        rows = {r["tview"]: r for r in show(conn, "TVIEWS") if r["database"] == "app"}
    assert set(rows) == {"tv_company", "tv_user", "tv_post"}
    for entity in ("company", "user", "post"):
        row = rows[f"tv_{entity}"]
        assert row["entity"] == entity
        assert row["pk_column"] == f"pk_{entity}"
        assert row["strategy"] == "incremental"
        assert row["rows"] is None  # not known without a query
        assert row["created_at"]
    assert "public.tb_post" in rows["tv_post"]["sources"].split(",")
    assert set(rows["tv_post"]["depends_on"].split(",")) == {"company", "user"}  # transitive
    assert rows["tv_company"]["depends_on"] == ""


def test_show_tview_stats_after_update(fixture_f: Any) -> None:
    with admin(fixture_f) as conn, psycopg.connect(fixture_f.dsn("app"), autocommit=True) as c:
        before = stats(conn)
        assert {"tv_company", "tv_user", "tv_post", "*"} <= set(before)
        c.execute("UPDATE tb_post SET title = 'x' WHERE pk_post = 1")
        wait_for(lambda: stats(conn)["tv_post"]["refresh_statements"]
                 > before["tv_post"]["refresh_statements"])
        after = stats(conn)
    post_b, post_a = before["tv_post"], after["tv_post"]
    assert post_a["refresh_statements"] == post_b["refresh_statements"] + 1
    assert post_a["keys_enqueued"] == post_b["keys_enqueued"] + 1
    assert post_a["commits"] == post_b["commits"] + 1
    assert post_a["last_refresh_at"] is not None
    assert post_a["avg_refresh_us"] == post_a["total_refresh_us"] // post_a["refresh_statements"]
    assert after["tv_user"] == before["tv_user"]
    assert after["*"]["refresh_statements"] == before["*"]["refresh_statements"] + 1


def test_show_tview_queue(fixture_f: Any) -> None:
    with admin(fixture_f) as conn, psycopg.connect(fixture_f.dsn("app")) as c:
        assert [r for r in show(conn, "TVIEW QUEUE") if r["database"] == "app"] == []
        c.execute("UPDATE tb_post SET title = 'y' WHERE pk_post = 2")
        rows = [r for r in show(conn, "TVIEW QUEUE") if r["database"] == "app"]
        assert len(rows) == 1
        (row,) = rows
        assert row["entity"] == "post" and row["keys"] == 1
        assert row["savepoint_depth"] == 0
        assert row["age_us"] >= 0
        assert row["client_id"] in {r["id"] for r in show(conn, "CLIENTS")}
        c.commit()
        assert [r for r in show(conn, "TVIEW QUEUE") if r["database"] == "app"] == []


def test_tview_commands_without_engine(proxy_factory: Any) -> None:
    proxy = proxy_factory(tview={"enabled": False})
    with admin(proxy) as conn:
        for what in ("TVIEWS", "TVIEW STATS", "TVIEW QUEUE"):
            assert show(conn, what) == [], what
