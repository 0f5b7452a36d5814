"""The tvproxy command line: check, serve's config errors, and demo's plumbing.

These run ``python -m tvproxy`` as a subprocess, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TVPROXY_")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tvproxy", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


GOOD = """
[proxy]
listen_addr = "127.0.0.1"
listen_port = 6999
[databases.app]
host = "127.0.0.1"
[databases.reports]
dsn = "postgresql://r@db.internal/warehouse"
"""


def test_check_good_file(tmp_path: Path) -> None:
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    r = run("check", "-c", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok: listening on 127.0.0.1:6999, 2 database(s): app, reports"


def test_check_example_config() -> None:
    r = run("check", "-c", str(REPO / "conf" / "tvproxy.toml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: listening on 127.0.0.1:6432, 1 database(s): app")


def test_check_bad_file_is_one_line_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[proxy]\nlisten_port = "abc"\n')
    r = run("check", "-c", str(f))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == f"{f}: proxy.listen_port: expected an integer, got 'abc'\n"


def test_check_unknown_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[proxy]\nlisten_prot = 1\n")
    r = run("check", "-c", str(f))
    assert r.returncode == 2
    assert r.stderr == f"{f}: proxy.listen_prot: unknown key\n"


def test_check_pgbouncer_key_warns_but_passes(tmp_path: Path) -> None:
    f = tmp_path / "pgb.toml"
    f.write_text(GOOD.replace("[proxy]\n", "[proxy]\nserver_round_robin = 1\n"))
    r = run("check", "-c", str(f))
    assert r.returncode == 0
    assert f"warning: {f}: proxy.server_round_robin: PgBouncer setting" in r.stderr


def test_check_env_and_set_overrides(tmp_path: Path) -> None:
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    r = run("check", "-c", str(f), env={"TVPROXY_PROXY_LISTEN_PORT": "7001"})
    assert r.returncode == 0 and "127.0.0.1:7001" in r.stdout
    r = run("check", "-c", str(f), "--set", "proxy.listen_port=7002")
    assert r.returncode == 0 and "127.0.0.1:7002" in r.stdout
    r = run("check", "-c", str(f), env={"TVPROXY_PROXY_LISTEN_PORT": "x"})
    assert r.returncode == 2
    assert (
        r.stderr == "$TVPROXY_PROXY_LISTEN_PORT: proxy.listen_port: expected an integer, got 'x'\n"
    )


def test_check_missing_file() -> None:
    r = run("check", "-c", "/nonexistent/x.toml")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "/nonexistent/x.toml: cannot read" in r.stderr


def test_check_pgbouncer_ini(tmp_path: Path) -> None:
    f = tmp_path / "pgbouncer.ini"
    f.write_text("[databases]\napp = host=127.0.0.1 dbname=app\n[pgbouncer]\nlisten_port = 6433\n")
    r = run("check", "--pgbouncer-ini", str(f))
    assert r.returncode == 0, r.stderr
    assert "127.0.0.1:6433, 1 database(s): app" in r.stdout


@pytest.mark.parametrize("content", ["", "[databases]\n", "[proxy]\nlisten_port = 7000\n"])
def test_serve_without_databases_names_demo(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.toml"
    f.write_text(content)
    r = run("serve", "-c", str(f))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{f}: databases: no database configured")
    assert "tvproxy demo" in lines[0]


def test_serve_bad_config_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[auth]\nauth_type = "ldap"\n[databases.app]\nhost = "h"\n')
    r = run("serve", "-c", str(f))
    assert r.returncode == 2
    assert r.stderr.startswith(f"{f}: auth.auth_type: expected one of")


def test_usage_errors_exit_2() -> None:
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("tvproxy ")


def test_demo_refuses_a_busy_port() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("demo", "--port", str(port))
    assert r.returncode == 1
    assert f"port {port}" in r.stderr and "--port" in r.stderr


def test_demo_end_to_end() -> None:
    """`tvproxy demo`: throwaway cluster + demo schema + proxy; SIGINT removes everything."""
    import re
    import signal
    import socket
    import time

    import psycopg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvproxy", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "demo did not start listening"
                time.sleep(0.1)
        dsn = f"host=127.0.0.1 port={port} dbname=app user=postgres"
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            titles = {r[0] for r in conn.execute("SELECT title FROM tb_post")}
            assert "Hello, TVIEWs" in titles
            assert conn.execute("SELECT count(*) FROM tb_comment").fetchone()[0] == 3
            # the demo TVIEWs exist and the proxy keeps tv_post fresh through v_user
            assert conn.execute("SELECT count(*) FROM tv_post").fetchone()[0] == 3
            conn.execute("UPDATE tb_user SET name = 'Alicia' WHERE email = 'alice@acme.example'")
            conn.commit()
            authors = conn.execute(
                "SELECT data->'author'->>'name' FROM tv_post WHERE data->>'title' = 'Hello, TVIEWs'"
            ).fetchone()
            assert authors == ("Alicia",)
            comments = conn.execute(
                "SELECT jsonb_array_length(data->'comments') FROM tv_post"
                " WHERE data->>'title' = 'Hello, TVIEWs'"
            ).fetchone()
            assert comments == (2,)
            for tv, v in (
                ("tv_company", "v_company"),
                ("tv_user", "v_user"),
                ("tv_post", "v_post"),
            ):
                drift = conn.execute(
                    f"SELECT count(*) FROM ((TABLE {tv} EXCEPT TABLE {v})"
                    f" UNION ALL (TABLE {v} EXCEPT TABLE {tv})) d"
                ).fetchone()
                assert drift == (0,), tv
            conn.commit()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f'psql "host=127.0.0.1 port={port} dbname=app user=postgres"' in out
    assert "dbname=tvproxy" in out
    assert "tv_post (3 rows" in out and "UPDATE tb_user" in out
    m = re.search(r"throwaway, (\S+)\)", out)
    assert m, out
    assert not Path(m.group(1)).exists(), "the demo cluster was not removed"
