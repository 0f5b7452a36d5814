"""Test harness: the PostgreSQL under test and tvproxy processes started from a config dict.

Nothing here mocks a server: tests talk to a real PostgreSQL through a real tvproxy process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# TOML emitter (tomllib only reads)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes (ensure_ascii=False keeps
    # astral characters literal; TOML has no surrogate-pair escapes).
    return json.dumps(s, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = ", ".join(
            f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None
        )
        return "{" + items + "}" if items else "{}"
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Render a nested dict as TOML: scalars first, then one [table] per nested dict.

    ``None`` values are left out (TOML has no null).
    """
    lines: list[str] = []

    def emit(table: dict[str, Any], path: list[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, dict)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if path and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables:
            emit(v, [*path, k])

    emit(data, [])
    return "\n".join(lines) + "\n"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overrides`` into a copy of ``base``; a ``None`` value deletes the key."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def libpq_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_userlist(path: Path, users: dict[str, str]) -> None:
    """PgBouncer userlist.txt: ``"user" "password-or-secret"`` per line."""

    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    path.write_text("".join(f"{q(u)} {q(p)}\n" for u, p in users.items()))


# --------------------------------------------------------------------------------------------
# The PostgreSQL under test when TVPROXY_TEST_DSN is set


class ExternalServer:
    """Same attributes as tvproxy.embedded.TempCluster, for a server we did not start."""

    def __init__(self, dsn: str) -> None:
        from tvproxy.config import parse_dsn

        params = parse_dsn(dsn)
        self.host = params.get("host", "127.0.0.1")
        self.port = int(params.get("port", "5432"))
        self.user = params.get("user", "postgres")
        self.password: str | None = params.get("password") or None
        self.admin_dbname = params.get("dbname", "postgres")
        self.data_dir = None
        self.bindir = None
        self.version: int | None = None

    def dsn(self, dbname: str = "postgres") -> str:
        s = f"host={self.host} port={self.port} dbname={libpq_quote(dbname)} user={libpq_quote(self.user)}"
        if self.password:
            s += f" password={libpq_quote(self.password)}"
        return s

    def url(self, dbname: str = "postgres") -> str:
        from urllib.parse import quote

        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def bin(self, name: str) -> str:
        return shutil.which(name) or name

    def start(self) -> ExternalServer:
        return self

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# A tvproxy process


class ProxyProcess:
    """``python -m tvproxy serve -c <file>`` in a subprocess, configured from a nested dict.

    ``config`` is shaped like the TOML ({"proxy": {...}, "databases": {"app": {...}}}).
    ``userlist`` (user -> password or secret) is written next to the config and becomes
    ``auth.auth_file`` unless the config names one.  Output (stdout and stderr) goes to a log
    file read by ``logs()``.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        userlist: dict[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tvproxy-test-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "tvproxy.toml"
        self.userlist_path = self.workdir / "userlist.txt"
        self.log_path = self.workdir / "tvproxy.log"
        self.extra_env = dict(env or {})
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.config: dict[str, Any] = {}
        self.write_config(config, userlist=userlist)

    # -- configuration --------------------------------------------------------------------

    def write_config(self, config: dict[str, Any], userlist: dict[str, str] | None = None) -> None:
        """(Re)write the config file (and userlist); send SIGHUP yourself to reload."""
        config = copy.deepcopy(config)
        proxy = config.setdefault("proxy", {})
        proxy.setdefault("listen_addr", "127.0.0.1")
        if not proxy.get("listen_port"):
            proxy["listen_port"] = self.config.get("proxy", {}).get("listen_port") or free_port()
        if userlist is not None:
            write_userlist(self.userlist_path, userlist)
            config.setdefault("auth", {}).setdefault("auth_file", str(self.userlist_path))
        self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(to_toml(config))
        os.replace(tmp, self.config_path)  # a reload never sees half a file

    @property
    def host(self) -> str:
        addr = self.config["proxy"]["listen_addr"]
        return "127.0.0.1" if addr in ("*", "0.0.0.0", "") else addr

    @property
    def port(self) -> int:
        return int(self.config["proxy"]["listen_port"])

    # -- connection strings ---------------------------------------------------------------

    def dsn(
        self, dbname: str = "app", user: str = "postgres", password: str | None = None, **extra: Any
    ) -> str:
        """libpq key=value string (psycopg, psql)."""
        parts = [
            f"host={self.host}",
            f"port={self.port}",
            f"dbname={libpq_quote(dbname)}",
            f"user={libpq_quote(user)}",
        ]
        if password is not None:
            parts.append(f"password={libpq_quote(password)}")
        parts += [f"{k}={libpq_quote(str(v))}" for k, v in extra.items()]
        return " ".join(parts)

    def url(self, dbname: str = "app", user: str = "postgres", password: str | None = None) -> str:
        """postgresql:// URL (asyncpg)."""
        from urllib.parse import quote

        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    # -- process control ------------------------------------------------------------------

    def argv(self) -> list[str]:
        if self.command is not None:
            return [a.replace("{config}", str(self.config_path)) for a in self.command]
        return [sys.executable, "-m", "tvproxy", "serve", "-c", str(self.config_path)]

    def _env(self) -> dict[str, str]:
        # Configuration comes from the file only: drop TVPROXY_<SECTION>_* from the outer env.
        sections = ("PROXY_", "AUTH_", "ADMIN_", "DATABASES_", "TVIEW_")
        env = {
            k: v
            for k, v in os.environ.items()
            if not (k.startswith("TVPROXY_") and k[8:].startswith(sections))
        }
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        # debug: the tests read the per-refresh ``tview refresh`` events (tview_fixture.py)
        env.setdefault("TVPROXY_LOG_LEVEL", "debug")
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 10.0) -> ProxyProcess:
        if self.running:
            return self
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self._env(),
            cwd=str(self.workdir),
            start_new_session=True,  # a Ctrl-C at the terminal goes to pytest, not here
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the listen port accepts TCP; on failure the error carries the logs."""
        deadline = time.monotonic() + timeout
        try:
            port: int | None = self.port
        except (TypeError, ValueError):  # a test of a bad listen_port: wait for the exit
            port = None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"tvproxy exited with code {self.proc.returncode} before listening on "
                    f"{self.host}:{port}\n--- tvproxy output ---\n{self.logs()}"
                )
            if port is not None:
                try:
                    with socket.create_connection((self.host, port), timeout=0.5):
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tvproxy did not accept TCP on {self.host}:{port} within {timeout}s"
                    f"\n--- tvproxy output ---\n{self.logs()}"
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def reload(
        self, config: dict[str, Any] | None = None, userlist: dict[str, str] | None = None
    ) -> None:
        """Optionally rewrite the config, then SIGHUP."""
        if config is not None or userlist is not None:
            self.write_config(config if config is not None else self.config, userlist=userlist)
        self.send_signal(signal.SIGHUP)

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # the whole session: workers = N forks children
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        port = self.config.get("proxy", {}).get("listen_port")
        return f"<ProxyProcess {self.host}:{port} pid={self.pid} running={self.running}>"
