"""SHOW TVIEW PENDING and `tvproxy recover` (DESIGN §2, §4, §5.6) through a real tvproxy over
fixture F, on every PostgreSQL at hand (prepared queues are found through pg_locks): a
transaction prepared through the proxy is listed as ``prepared`` with its keys; committed
straight on the server (the proxy's recovery pass is far away) it is
``committed-awaiting-catch-up``; `tvproxy recover -c FILE` catches it up and the list is empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import tview_fixture
from harness import free_port, to_toml, wait_until
from tview_fixture import drift, oracle

REPO = Path(__file__).resolve().parents[2]
FAR = 3600  # recovery_interval: no recovery pass during a test (only the one at start)
COLUMNS = ["gid", "database", "keys", "prepared_at", "state"]


def recover(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "tvproxy", "recover", *args],
                          capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


def pending(proxy: Any) -> list[dict[str, Any]]:
    """SHOW TVIEW PENDING rows of database app, through the extended protocol (psycopg 3)."""
    with tview_fixture.admin(proxy) as c:
        cur = c.execute("SHOW TVIEW PENDING")
        assert [d.name for d in cur.description] == COLUMNS
        rows = [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]
    return [r for r in rows if r["database"] == "app"]


def pending_psql(proxy: Any) -> list[dict[str, Any]]:
    """The same through the simple query protocol (psql)."""
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1",
         proxy.dsn("pgbouncer", user="postgres"), "-c", "SHOW TVIEW PENDING"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [dict(zip(COLUMNS, line.split("|"), strict=True)) for line in out.splitlines() if line]
    return [{**r, "keys": r["keys"] or None} for r in rows if r["database"] == "app"]


def summary(rows: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    return [(r["gid"], r["keys"], r["state"]) for r in rows]


def prepare(proxy: Any, sql: str, gid: str) -> None:
    with psycopg.connect(proxy.dsn("app")) as c:
        c.execute(sql)
        c.execute(f"PREPARE TRANSACTION '{gid}'")


def direct(pg: Any, sql: str) -> None:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        c.execute(sql)


def test_pending_prepared_committed_elsewhere_then_recover(tview_pg: Any,
                                                          tview_proxy_factory: Any) -> None:
    pg, proxy_factory = tview_pg, tview_proxy_factory
    proxy = proxy_factory(tview={"recovery_interval": FAR})
    try:
        tview_fixture.reset(pg, proxy)
        assert pending(proxy) == [] and pending_psql(proxy) == []

        prepare(proxy, "UPDATE tb_user SET name = 'pending' WHERE pk_user = 2", "gp1")
        rows = pending(proxy)
        assert summary(rows) == [("gp1", "user:1", "prepared")]
        assert rows[0]["prepared_at"]
        assert summary(pending_psql(proxy)) == summary(rows)
        # another instance sees that gp1 holds a queue, not what is in it (invisible until the
        # transaction commits, and that instance did not write it)
        other = proxy_factory(tview={"recovery_interval": FAR})
        assert summary(pending(other)) == [("gp1", None, "prepared")]
        other.stop()

        direct(pg, "COMMIT PREPARED 'gp1'")  # not through the proxy: no catch-up yet
        rows = pending(proxy)
        assert summary(rows) == [("gp1", "user:1", "committed-awaiting-catch-up")]
        assert summary(pending_psql(proxy)) == summary(rows)
        # the refresh before PREPARE left tv_ fresh; make the persisted keys' rows stale behind
        # the proxy's back so the catch-up has something to repair (and shows that it did)
        direct(pg, "UPDATE tv_user SET data = '{}' WHERE pk_user = 2;"
                   " UPDATE tv_post SET data = '{}' WHERE fk_user = 2")
        stale = drift(pg)
        assert stale["user"] > 0 and stale["post"] > 0

        r = recover("-c", str(proxy.config_path))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert ("app: caught up gp1 (keys user:1): tv_user: 1 upserted, 0 deleted;"
                " tv_post: 1 upserted, 0 deleted") in lines, r.stdout
        assert "app2: no TVIEWs, nothing to do" in lines
        oracle(pg)
        assert wait_until(lambda: pending(proxy) == [], timeout=10)
        assert pending_psql(proxy) == []

        r = recover("-c", str(proxy.config_path), "--database", "app")
        assert (r.returncode, r.stdout) == (0, "app: nothing to do\n"), r.stderr
    finally:
        proxy.stop()
        tview_fixture.cleanup(pg)


def test_pending_lists_only_queues_that_exist(tview_pg: Any, tview_proxy_factory: Any) -> None:
    pg, proxy_factory = tview_pg, tview_proxy_factory
    proxy = proxy_factory(tview={"recovery_interval": FAR})
    try:
        tview_fixture.reset(pg, proxy)
        # a prepared transaction without TVIEW keys persists no queue: not listed
        prepare(proxy, "SELECT 1", "gplain")
        # a PREPARE that fails after the queue was written leaves nothing either
        with psycopg.connect(proxy.dsn("app")) as c:
            c.execute("CREATE TEMP TABLE scratch (i int)")
            c.execute("UPDATE tb_user SET name = 'never' WHERE pk_user = 1")
            try:
                c.execute("PREPARE TRANSACTION 'gfail'")
            except psycopg.errors.FeatureNotSupported:
                pass
            else:
                raise AssertionError("PREPARE after touching a temporary table succeeded")
        assert pending(proxy) == []
        prepare(proxy, "UPDATE tb_post SET title = 't' WHERE pk_post IN (1, 2)", "gp2")
        assert summary(pending(proxy)) == [("gp2", "post:2", "prepared")]
        r = recover("-c", str(proxy.config_path), "--database", "app")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["app: nothing to do", "app: still pending: gp2 (prepared)"]
        direct(pg, "ROLLBACK PREPARED 'gp2'")  # the queue goes with the transaction
        assert pending(proxy) == []
        oracle(pg)
    finally:
        proxy.stop()
        tview_fixture.cleanup(pg)


def test_gid_reused_before_catch_up_keeps_both_queues(tview_pg: Any,
                                                      tview_proxy_factory: Any) -> None:
    pg, proxy_factory = tview_pg, tview_proxy_factory
    proxy = proxy_factory(tview={"recovery_interval": FAR})
    try:
        tview_fixture.reset(pg, proxy)
        prepare(proxy, "UPDATE tb_user SET name = 'first' WHERE pk_user = 2", "greuse")
        direct(pg, "COMMIT PREPARED 'greuse'")
        # the same gid again while the first queue still waits for its catch-up
        prepare(proxy, "UPDATE tb_company SET name = 'second' WHERE pk_company = 2", "greuse")
        assert summary(pending(proxy)) == [("greuse", "company:1", "prepared"),
                                           ("greuse", "user:1", "committed-awaiting-catch-up")]
        direct(pg, "COMMIT PREPARED 'greuse'")
        assert summary(pending(proxy)) == [
            ("greuse", "company:1,user:1", "committed-awaiting-catch-up")]
        r = recover("-c", str(proxy.config_path), "--database", "app")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("app: caught up greuse (keys company:1,user:1): "), r.stdout
        assert pending(proxy) == []
        oracle(pg)
    finally:
        proxy.stop()
        tview_fixture.cleanup(pg)


def test_recover_errors(pg: Any, tmp_path: Path) -> None:
    conf = tmp_path / "tvproxy.toml"
    conf.write_text(to_toml({"databases": {"app": {"host": "127.0.0.1", "port": free_port(),
                                                   "dbname": "app", "user": pg.user}}}))
    r = recover("-c", str(conf), "--database", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.splitlines()) == 1
    r = recover("-c", str(conf))  # nothing listens there
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(
        "tvproxy recover: database app: "), r.stderr
