"""TVIEWs coherent across proxy instances (DESIGN.md 5.1), and TVIEWs in application schemas.

Two proxies serve one database that has no TVIEW when they start: a TVIEW created through one
(or the CLI) is maintained by the other from the creating COMMIT on, a DROP stops it there
without errors.  TVIEW DDL through the proxy resolves names with the client's own settings
(search_path from the startup packet or SET), inside or outside a transaction block.

The oracle is fixture F's (tv_x EXCEPT v_x both ways), schema-qualified where the TVIEWs live
in schema ``app``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import tview_fixture
from harness import REPO_ROOT, ProxyProcess, wait_until
from tview_fixture import SELECTS, TVIEWS, admin, reset

LISTENERS = ("SELECT application_name FROM pg_stat_activity WHERE datname = 'app'"
             " AND application_name LIKE 'tvproxy-listener %'")


@pytest.fixture
def base_f(pg: Any) -> Iterator[None]:
    """F's tb_ tables in public, no TVIEW, no catalog; cleaned up after."""
    reset(pg, None, with_tviews=False)
    yield
    tview_fixture.cleanup(pg)


def listeners(pg: Any) -> list[str]:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        return [r[0] for r in c.execute(LISTENERS).fetchall()]


def wait_listening(pg: Any, n: int) -> None:
    """``n`` proxies listen on app and have loaded its catalog."""
    assert wait_until(lambda: len([a for a in listeners(pg) if not a.endswith(" -")]) == n, 10), \
        listeners(pg)


def drift(pg: Any, schema: str = "public") -> dict[str, int]:
    """Rows by which each TVIEW of the catalog differs from its view (schema-qualified)."""
    out = {}
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        for (entity,) in c.execute("SELECT entity FROM tvproxy.tview").fetchall():
            tv, v = f"{schema}.tv_{entity}", f"{schema}.v_{entity}"
            out[entity] = c.execute(
                f"SELECT count(*) FROM ((TABLE {tv} EXCEPT TABLE {v})"
                f" UNION ALL (TABLE {v} EXCEPT TABLE {tv})) d").fetchone()[0]
    return out


def show_tviews(proxy: ProxyProcess) -> set[str]:
    with admin(proxy) as c:
        return {r[1] for r in c.execute("SHOW TVIEWS").fetchall() if r[0] == "app"}


def refreshes(proxy: ProxyProcess) -> int:
    return int(tview_fixture.stats(proxy).get("*", {}).get("refresh_statements") or 0)


def test_created_through_one_proxy_is_maintained_by_another(
        pg: Any, base_f: None, proxy_factory: Any) -> None:
    a, b = proxy_factory(), proxy_factory()
    wait_listening(pg, 2)
    with psycopg.connect(b.dsn("app"), autocommit=True) as cb:
        # a transaction open on B across the creation: its COMMIT refreshes the new TVIEW whole
        open_tx = psycopg.connect(b.dsn("app"))
        open_tx.execute("SELECT 1")
        with psycopg.connect(a.dsn("app"), autocommit=True) as ca:
            ca.execute(TVIEWS[0])  # tv_company
        assert "tv_company" in show_tviews(b)  # B loaded it before A answered
        # writes through B right after A's CREATE answered: fresh at their COMMIT
        cb.execute("UPDATE tb_company SET name = 'Acme B' WHERE pk_company = 1")
        assert drift(pg) == {"company": 0}
        with cb.transaction():
            cb.execute("INSERT INTO tb_company VALUES (3, DEFAULT, 'Initech')")
            cb.execute("UPDATE tb_company SET name = 'Globex B' WHERE pk_company = 2")
        assert drift(pg) == {"company": 0}
        with psycopg.connect(pg.dsn("app"), autocommit=True) as direct:
            direct.execute("UPDATE tv_company SET data = data || '{\"stamp\": 1}'")
            open_tx.execute("UPDATE tb_company SET name = 'open' WHERE pk_company = 3")
            open_tx.commit()
            stamped = direct.execute(
                "SELECT count(*) FROM tv_company WHERE data ? 'stamp'").fetchone()[0]
        open_tx.close()
        assert stamped == 0  # every row recomputed: the transaction began before the reload
        assert drift(pg) == {"company": 0}
        # nested TVIEWs created through A, written through B
        with psycopg.connect(a.dsn("app"), autocommit=True) as ca:
            ca.execute(TVIEWS[1])
            ca.execute(TVIEWS[2])
        cb.execute("UPDATE tb_company SET name = 'Acme again' WHERE pk_company = 1")
        cb.execute("INSERT INTO tb_comment VALUES (3, DEFAULT, 2, 'c3')")
        assert drift(pg) == {"company": 0, "user": 0, "post": 0}
        # DROP through A: B stops refreshing, its writes still work
        with psycopg.connect(a.dsn("app"), autocommit=True) as ca:
            ca.execute("DROP TABLE tv_post, tv_user, tv_company")
        assert show_tviews(b) == set()
        before = refreshes(b)
        cb.execute("UPDATE tb_company SET name = 'after drop' WHERE pk_company = 1")
        with cb.transaction():
            cb.execute("UPDATE tb_post SET title = 'after drop' WHERE pk_post = 1")
        assert refreshes(b) == before
    assert int(tview_fixture.stats(b)["*"]["errors"]) == 0


def test_created_inside_a_block_is_maintained_by_another(
        pg: Any, base_f: None, proxy_factory: Any) -> None:
    a, b = proxy_factory(), proxy_factory()
    wait_listening(pg, 2)
    with psycopg.connect(a.dsn("app")) as ca:
        ca.execute(TVIEWS[0])
        ca.commit()  # B has loaded it when the COMMIT returns
    with psycopg.connect(b.dsn("app"), autocommit=True) as cb:
        cb.execute("UPDATE tb_company SET name = 'Acme B' WHERE pk_company = 1")
    assert drift(pg) == {"company": 0}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVPROXY_") and k != "PGDSN"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "tvproxy", "tview", *args], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def test_created_by_the_cli_is_maintained_by_a_running_proxy(
        pg: Any, base_f: None, proxy_factory: Any) -> None:
    proxy = proxy_factory()
    wait_listening(pg, 1)
    r = _cli("--dsn", pg.dsn("app"), "create", f"CREATE TABLE tv_company AS {SELECTS['company']}")
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        c.execute("UPDATE tb_company SET name = 'Acme CLI' WHERE pk_company = 1")
    assert drift(pg) == {"company": 0}
    r = _cli("--dsn", pg.dsn("app"), "drop", "tv_company")
    assert r.returncode == 0, r.stderr
    assert show_tviews(proxy) == set()
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        c.execute("UPDATE tb_company SET name = 'after drop' WHERE pk_company = 1")


def test_a_listener_that_does_not_acknowledge_is_reported(
        pg: Any, base_f: None, proxy_factory: Any) -> None:
    """A listener that never loads the generation (here a connection only named like one):
    the creator waits its bounded time, then warns and still answers."""
    proxy = proxy_factory()
    wait_listening(pg, 1)
    with psycopg.connect(pg.dsn("app"), autocommit=True,
                         application_name="tvproxy-listener tvproxy -"):
        with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
            notices: list[str] = []
            c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            c.execute(TVIEWS[0])
        assert any("did not load TVIEW catalog generation" in n for n in notices), notices
    assert drift(pg) == {"company": 0}


def test_an_autocommit_write_in_flight_across_the_creation(
        pg: Any, base_f: None, proxy_factory: Any) -> None:
    """B forwards an autocommit write before it knows the TVIEW; it reaches tb_company only
    after A's creating COMMIT (held back by an advisory lock in the same query).  B
    acknowledges the new catalog once that write has finished, so A's diff refresh sees it."""
    a, b = proxy_factory(), proxy_factory()
    wait_listening(pg, 2)
    def b_write() -> None:
        with psycopg.connect(b.dsn("app"), autocommit=True) as cb:
            cb.execute("SELECT pg_advisory_xact_lock(7474);"
                       " UPDATE tb_company SET name = 'in flight' WHERE pk_company = 1")

    def a_create() -> None:
        with psycopg.connect(a.dsn("app"), autocommit=True) as ca:
            ca.execute(TVIEWS[0])

    def one(c: psycopg.Connection, sql: str) -> Any:
        return c.execute(sql).fetchone()[0]

    with psycopg.connect(pg.dsn("app"), autocommit=True) as holder, ThreadPoolExecutor(2) as pool:
        holder.execute("SELECT pg_advisory_lock(7474)")
        try:
            wrote = pool.submit(b_write)
            assert wait_until(lambda: one(holder, "SELECT count(*) FROM pg_locks WHERE"
                                          " locktype = 'advisory' AND objid = 7474"
                                          " AND NOT granted") == 1, 5)
            created = pool.submit(a_create)
            # A's creating COMMIT is visible; B has reloaded but does not acknowledge while
            # its write is in flight (A's listener has): A waits
            assert wait_until(lambda: one(holder, "SELECT to_regclass('public.tv_company')"
                                          " IS NOT NULL"), 10)
            assert wait_until(lambda: "tview catalog changed" in b.logs(), 5)
            generation = one(holder, "SELECT value FROM tvproxy.generation")

            def lagging() -> int:
                return sum(1 for n in listeners(pg)
                           if n.endswith(" -") or int(n.rsplit(" ", 1)[1]) < generation)

            assert wait_until(lambda: lagging() == 1, 5)
            assert not wait_until(lambda: lagging() != 1 or created.done(), 0.5)
        finally:
            holder.execute("SELECT pg_advisory_unlock(7474)")
        wrote.result(10)
        created.result(10)
    assert drift(pg) == {"company": 0}


def test_a_lost_listener_comes_back(pg: Any, base_f: None, proxy_factory: Any) -> None:
    a, b = proxy_factory(), proxy_factory()
    wait_listening(pg, 2)
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        pids = [r[0] for r in c.execute(LISTENERS.replace("application_name", "pid", 1))]
        c.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (pids,))
        assert wait_until(lambda: not set(pids) & {
            r[0] for r in c.execute(LISTENERS.replace("application_name", "pid", 1))}, 5)
    wait_listening(pg, 2)  # both reconnected and reloaded
    with psycopg.connect(a.dsn("app"), autocommit=True) as ca:
        ca.execute(TVIEWS[0])
    with psycopg.connect(b.dsn("app"), autocommit=True) as cb:
        cb.execute("UPDATE tb_company SET name = 'Acme B' WHERE pk_company = 1")
    assert drift(pg) == {"company": 0}


# --------------------------------------------------------------------------------------------
# TVIEWs in an application schema, names resolved with the client's settings

APP_TABLES = tview_fixture.base_ddl("app")


@pytest.fixture
def app_schema(pg: Any) -> Iterator[None]:
    """F's tb_ tables in schema app (nothing in public), no catalog."""
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        c.execute(tview_fixture.FIXTURE)  # public as the other tests leave it
        c.execute("DROP SCHEMA IF EXISTS app CASCADE; DROP SCHEMA IF EXISTS tvproxy CASCADE")
        c.execute("DROP TABLE IF EXISTS tb_comment, tb_post, tb_user, tb_company CASCADE")
        with c.transaction():
            c.execute(APP_TABLES)
    yield
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS app CASCADE; DROP SCHEMA IF EXISTS tvproxy CASCADE")
    tview_fixture.cleanup(pg)


def _in_app(pg: Any, rel: str) -> bool:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        return c.execute("SELECT to_regclass(%s) IS NOT NULL", (f"app.{rel}",)).fetchone()[0]


def _writes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE tb_company SET name = name || '+' WHERE pk_company = 1")
        c.execute("INSERT INTO tb_comment VALUES (10, DEFAULT, 3, 'new')")
        with c.transaction():
            c.execute("UPDATE tb_user SET name = name || '+' WHERE pk_user = 2")
            c.execute("UPDATE app.tb_post SET title = title || '+' WHERE pk_post = 1")
        c.execute("DELETE FROM tb_comment WHERE pk_comment = 10")


def test_schema_from_the_startup_packet(pg: Any, app_schema: None, proxy_factory: Any) -> None:
    a, b = proxy_factory(), proxy_factory()
    wait_listening(pg, 2)
    opts = {"options": "-c search_path=app"}
    with psycopg.connect(a.dsn("app", **opts), autocommit=True) as c:
        assert c.execute(TVIEWS[0]).statusmessage == "SELECT 2"  # outside a block
    with psycopg.connect(a.dsn("app", **opts)) as c:
        c.execute(TVIEWS[1])  # inside a block
        c.execute(TVIEWS[2])
        c.commit()
    assert all(_in_app(pg, f"{p}_{e}") for p in ("tv", "v") for e in ("company", "user", "post"))
    assert show_tviews(a) == show_tviews(b) == {"tv_company", "tv_user", "tv_post"}
    _writes(a.dsn("app", **opts))
    assert drift(pg, "app") == {"company": 0, "user": 0, "post": 0}
    _writes(b.dsn("app", **opts))
    assert drift(pg, "app") == {"company": 0, "user": 0, "post": 0}
    b.stop()  # after a restart the catalog still points at schema app
    b.start()
    _writes(b.dsn("app", **opts))
    assert drift(pg, "app") == {"company": 0, "user": 0, "post": 0}


def test_schema_from_set(pg: Any, app_schema: None, proxy_factory: Any) -> None:
    # session pooling: a SET outside a block stays with the client on any PostgreSQL version
    proxy = proxy_factory(proxy={"pool_mode": "session"})
    wait_listening(pg, 1)
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        c.execute("SET search_path = app")
        assert c.execute(TVIEWS[0]).statusmessage == "SELECT 2"
    with psycopg.connect(proxy.dsn("app")) as c:
        c.execute("SET search_path = app")  # inside the block
        c.execute(TVIEWS[1])
        c.commit()
    assert _in_app(pg, "tv_company") and _in_app(pg, "tv_user")
    assert show_tviews(proxy) == {"tv_company", "tv_user"}
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        c.execute("SET search_path = app")
        c.execute("UPDATE tb_company SET name = 'Acme SET' WHERE pk_company = 1")
        c.execute("INSERT INTO tb_user VALUES (9, DEFAULT, 2, 'Dan', 'd@x')")
    assert drift(pg, "app") == {"company": 0, "user": 0}
    with psycopg.connect(proxy.dsn("app"), autocommit=True) as c:
        c.execute("SET search_path = app")
        c.execute("DROP TABLE tv_user")
        c.execute("DROP TABLE tv_company")
    assert not _in_app(pg, "tv_company") and show_tviews(proxy) == set()
