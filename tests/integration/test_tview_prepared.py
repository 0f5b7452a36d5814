"""Named prepared statements that write tracked tables or control transactions, executed many
times by many clients (pgbench -M prepared, psycopg prepare=True): every execution counts, also
when the proxy answered the Parse itself because another client had prepared the same text."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import tview_fixture
from tview_fixture import oracle

from tests.integration.test_pgbench import pgbench_path

fixture_f = tview_fixture.fixture_f

SCRIPT = """\\set u random(1, 3)
\\set p random(1, 3)
BEGIN;
UPDATE tb_user SET name = 'u' || :client_id || '-' || :u WHERE pk_user = :u;
UPDATE tb_post SET title = 't' || :client_id WHERE pk_post = :p;
END;
UPDATE tb_company SET name = 'c' || :client_id WHERE pk_company = 1;
"""


def test_pgbench_prepared_keeps_tviews_fresh(pg: Any, fixture_f: Any,
                                             tmp_path: Path) -> None:
    # one pgbench thread per client: pgbench prepares a command the first time it runs it,
    # synchronously, so with fewer servers (4) than clients a thread waiting there would stall
    # its other clients' open transactions (a pgbench/transaction-pooling deadlock, not ours)
    script = tmp_path / "tview.sql"
    script.write_text(SCRIPT)
    for mode in ("prepared", "extended", "simple"):
        cmd = [pgbench_path(pg), "-h", fixture_f.host, "-p", str(fixture_f.port), "-U",
               "postgres", "-n", "-M", mode, "-c", "6", "-j", "6", "-t", "40", "-f", str(script),
               "app"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PGSSLMODE": "disable"}, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr + fixture_f.logs()[-3000:]
        oracle(pg)


def test_psycopg_prepared_statements(pg: Any, fixture_f: Any) -> None:
    conns = [psycopg.connect(fixture_f.dsn("app"), prepare_threshold=0) for _ in range(3)]
    try:
        for round_ in range(4):
            for i, c in enumerate(conns):
                c.execute("UPDATE tb_user SET name = %s WHERE pk_user = %s",
                          (f"r{round_}-{i}", i + 1))
                c.execute("SELECT data->>'name' FROM tv_user WHERE pk_user = %s", (i + 1,))
                c.commit()
                oracle(pg)
    finally:
        for c in conns:
            c.close()
