"""`tvproxy tview create|list|verify|refresh|drop` against a real PostgreSQL, run as a user would
(``python -m tvproxy`` in a subprocess).  Own table names (tb_cliorg, tb_clistaff) so fixture F
tables of other tests in database app are never touched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]

SCHEMA = """
DROP TABLE IF EXISTS tv_clistaff, tv_cliorg CASCADE;
DROP VIEW IF EXISTS v_clistaff, v_cliorg CASCADE;
DROP TABLE IF EXISTS tb_clistaff, tb_cliorg CASCADE;
CREATE TABLE tb_cliorg (pk_cliorg BIGINT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE tb_clistaff (pk_clistaff BIGINT PRIMARY KEY,
  fk_cliorg BIGINT NOT NULL REFERENCES tb_cliorg, name TEXT NOT NULL);
INSERT INTO tb_cliorg VALUES (1, 'Acme'), (2, 'Globex');
INSERT INTO tb_clistaff VALUES (1, 1, 'Ann'), (2, 1, 'Ben'), (3, 2, 'Cid');
"""

ORG = (
    "CREATE TABLE tv_cliorg AS SELECT pk_cliorg, "
    "jsonb_build_object('name', name) AS data FROM tb_cliorg"
)
STAFF_SELECT = (
    "SELECT s.pk_clistaff, s.fk_cliorg, "
    "jsonb_build_object('name', s.name, 'org', v_cliorg.data) AS data "
    "FROM tb_clistaff s JOIN v_cliorg ON v_cliorg.pk_cliorg = s.fk_cliorg"
)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("TVPROXY_") and k != "PGDSN"
    }
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tvproxy", "tview", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _cleanup(dsn: str) -> None:
    r = run("--dsn", dsn, "drop", "tv_clistaff", "tv_cliorg", "--cascade", "--if-exists")
    assert r.returncode == 0, r.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA.split("CREATE TABLE tb_cliorg")[0])


@pytest.fixture
def db(pg: Any) -> Iterator[str]:
    url = pg.url("app")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    try:
        yield url
    finally:
        _cleanup(url)


def test_create_list_verify_refresh_drop(db: str) -> None:
    r = run("--dsn", db, "create", ORG)
    assert r.returncode == 0, r.stderr
    assert "created tv_cliorg: 2 row(s)" in r.stdout
    r = run("--dsn", db, "create", "clistaff", "--select", STAFF_SELECT)
    assert r.returncode == 0, r.stderr
    assert "created tv_clistaff: 3 row(s)" in r.stdout

    r = run("--dsn", db, "list")
    assert r.returncode == 0, r.stderr
    lines = {ln.split("\t")[0]: ln for ln in r.stdout.splitlines()}
    assert "pk=pk_cliorg" in lines["tv_cliorg"] and "depends_on=-" in lines["tv_cliorg"]
    assert "pk=pk_clistaff" in lines["tv_clistaff"]
    assert "depends_on=tv_cliorg" in lines["tv_clistaff"]

    r = run("--dsn", db, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tv_cliorg: fresh" in r.stdout and "tv_clistaff: fresh" in r.stdout

    # corrupt tv rows behind the engine's back (a direct write, not through the proxy)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE tv_clistaff SET data = '{}' WHERE pk_clistaff = 2")
        conn.execute("DELETE FROM tv_cliorg WHERE pk_cliorg = 2")
    r = run("--dsn", db, "verify")
    assert r.returncode == 1
    assert "tv_clistaff: 2 drifted row(s)" in r.stdout  # the bad row and the missing good one
    assert "tv_cliorg: 1 drifted row(s)" in r.stdout
    assert "refresh --full" in r.stderr

    r = run("--dsn", db, "refresh", "clistaff")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tv_clistaff: 1 upserted, 0 deleted"
    r = run("--dsn", db, "verify")
    assert r.returncode == 1 and "tv_clistaff: fresh" in r.stdout

    r = run("--dsn", db, "refresh", "--full")
    assert r.returncode == 0, r.stderr
    assert "tv_cliorg: 1 upserted, 0 deleted" in r.stdout
    r = run("--dsn", db, "verify")
    assert r.returncode == 0, r.stdout + r.stderr

    # dropping a TVIEW another one is built on needs --cascade
    r = run("--dsn", db, "drop", "tv_cliorg")
    assert r.returncode == 1
    assert r.stderr.startswith("ERROR: ") and "(SQLSTATE 2BP01)" in r.stderr
    r = run("--dsn", db, "drop", "tv_cliorg", "--cascade")
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split("\n")) >= {"dropped tv_cliorg", "dropped tv_clistaff"}
    with psycopg.connect(db) as conn:
        left = conn.execute(
            "SELECT to_regclass('tv_cliorg'), to_regclass('v_clistaff'), to_regclass('tb_cliorg')"
        ).fetchone()
    assert left is not None and left[0] is None and left[1] is None and left[2] is not None
    r = run("--dsn", db, "drop", "tv_cliorg", "--if-exists")
    assert r.returncode == 0, r.stderr


def test_errors_are_one_line_with_sqlstate(db: str) -> None:
    r = run("--dsn", db, "create", ORG)
    assert r.returncode == 0, r.stderr
    r = run("--dsn", db, "create", ORG)
    assert r.returncode == 1
    assert r.stderr == 'ERROR: TVIEW "tv_cliorg" already exists (SQLSTATE 42P07)\n'
    r = run("--dsn", db, "create", "clistaff", "--select", "SELECT pk_clistaff FROM tb_clistaff")
    assert r.returncode == 1
    assert r.stderr.startswith("ERROR: ") and "(SQLSTATE 42703)" in r.stderr
    r = run("--dsn", db, "drop", "tv_clinothing")
    assert r.returncode == 1 and "(SQLSTATE 42P01)" in r.stderr
    r = run("--dsn", db, "refresh", "clinothing")
    assert r.returncode == 1 and "(SQLSTATE 42P01)" in r.stderr


def test_dsn_from_env_and_from_config(db: str, pg: Any, tmp_path: Path) -> None:
    r = run("list")
    assert r.returncode == 2 and "--dsn" in r.stderr
    r = run("create", ORG, env={"TVPROXY_DSN": pg.dsn("app")})  # key=value form
    assert r.returncode == 0, r.stderr
    r = run("list", env={"PGDSN": db})
    assert r.returncode == 0 and "tv_cliorg\t" in r.stdout, r.stderr
    cfg = tmp_path / "tvproxy.toml"
    password = f'password = "{pg.password}"\n' if getattr(pg, "password", "") else ""
    cfg.write_text(
        f'[databases.main]\nhost = "{pg.host}"\nport = {pg.port}\ndbname = "app"\n'
        f'user = "{pg.user}"\n{password}'
    )
    r = run("-c", str(cfg), "--database", "main", "verify")
    assert r.returncode == 0, r.stderr
    assert "tv_cliorg: fresh" in r.stdout
    r = run("-c", str(cfg), "--database", "nope", "list")
    assert r.returncode == 2 and "databases.nope" in r.stderr
