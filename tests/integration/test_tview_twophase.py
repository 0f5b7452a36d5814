"""Two-phase commit through the proxy: PREPARE TRANSACTION injects the refresh and persists the
queue; COMMIT PREPARED (through the proxy, or straight on the server and then a recovery pass)
is followed by a catch-up that leaves no pending row; ROLLBACK PREPARED leaves nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import tview_fixture
from harness import wait_until
from tview_fixture import oracle

fixture_f = tview_fixture.fixture_f


def _pending(pg: Any) -> int:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        return c.execute("SELECT count(*) FROM tvproxy.pending_refresh").fetchone()[0]


def _names(pg: Any) -> tuple[str, str, str]:
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        return c.execute(
            "SELECT (SELECT name FROM tb_user WHERE pk_user = 2),"
            " (SELECT data->>'name' FROM tv_user WHERE pk_user = 2),"
            " (SELECT data->'author'->>'name' FROM tv_post WHERE pk_post = 3)").fetchone()


def test_prepare_then_commit_prepared_elsewhere(pg: Any, fixture_f: Any) -> None:
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("UPDATE tb_user SET name = '2pc' WHERE pk_user = 2")
        c.execute("PREPARE TRANSACTION 'g1'")
    assert _names(pg) == ("Bob", "Bob", "Bob")  # nobody sees it before COMMIT PREPARED
    assert _pending(pg) == 0  # the queue is invisible until then as well
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as other:
        other.execute("COMMIT PREPARED 'g1'")
    assert _names(pg) == ("2pc", "2pc", "2pc")
    assert _pending(pg) == 0
    oracle(pg)
    with psycopg.connect(fixture_f.dsn("app")) as c:
        c.execute("UPDATE tb_user SET name = 'never' WHERE pk_user = 2")
        c.execute("PREPARE TRANSACTION 'g2'")
    with psycopg.connect(fixture_f.dsn("app"), autocommit=True) as other:
        other.execute("ROLLBACK PREPARED 'g2'")
    assert _names(pg) == ("2pc", "2pc", "2pc") and _pending(pg) == 0
    oracle(pg)


def test_commit_prepared_on_the_server_is_recovered(pg: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(tview={"recovery_interval": 0.5})
    try:
        tview_fixture.reset(pg, proxy)
        with psycopg.connect(proxy.dsn("app")) as c:
            c.execute("UPDATE tb_user SET name = 'direct' WHERE pk_user = 2")
            c.execute("PREPARE TRANSACTION 'g3'")
        with psycopg.connect(pg.dsn("app"), autocommit=True) as direct:
            direct.execute("COMMIT PREPARED 'g3'")
        assert _names(pg) == ("direct", "direct", "direct")  # refreshed before PREPARE
        assert wait_until(lambda: _pending(pg) == 0, timeout=10)
        assert wait_until(lambda: "tview 2pc catch-up" in proxy.logs(), timeout=10)  # recovery
        oracle(pg)
    finally:
        proxy.stop()
        tview_fixture.cleanup(pg)
