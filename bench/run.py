#!/usr/bin/env python3
"""pgbench side by side: direct PostgreSQL, PgBouncer and tvproxy, in one run, on one cluster.

    python bench/run.py                                   # -S and -N, simple/extended/prepared, 16 clients
    python bench/run.py --duration 10 --runs 3 --clients 16,32 --modes simple,extended,prepared
    python bench/run.py -S --modes simple --clients 16    # one workload only

One process run does everything: a throwaway PostgreSQL cluster (``tvproxy.embedded.TempCluster``),
database ``bench`` initialised with ``pgbench -i -s <scale>``, PgBouncer (Debian package) and
tvproxy in front of it with the same pool mode (transaction) and the same pool size, then for
every workload (builtin x query mode x client count) the three targets are measured interleaved
(direct, pgbouncer, tvproxy, direct, ...) ``--runs`` times for ``--duration`` seconds each.

Results: ``bench/results/<timestamp>-pgbench.json`` (every run's raw figures, medians, ratios,
machine info), ``bench/results/<timestamp>-pgbench.md`` and a copy in ``bench/results/latest.md``,
plus ``<timestamp>-pgbench.png`` when matplotlib happens to be importable (it is not a dependency).

PgBouncer 1.18 cannot do protocol-level prepared statements in transaction mode (that came in
1.21), so ``-M prepared`` through PgBouncer is recorded as "n/a (unsupported)" and not run.

Every process started here (PostgreSQL, PgBouncer, tvproxy, pgbench) is stopped on the way out,
also after Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tvproxy.embedded import TempCluster, free_port  # noqa: E402

TARGETS = ("direct", "pgbouncer", "tvproxy")
BUILTINS = {"S": "select-only (-S)", "N": "simple-update (-N)"}
MODES = ("simple", "extended", "prepared")
UNSUPPORTED = "n/a (unsupported)"
DBNAME = "bench"
USER = "postgres"

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding) initial connection time\)", re.M)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_XACTS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
_RETRIED_RE = re.compile(r"^number of transactions retried: (\d+)", re.M)


class BenchError(RuntimeError):
    pass


# -- small helpers ----------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_port(host: str, port: int, proc: subprocess.Popen[Any], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not listen on {host}:{port} within 30s:\n{_tail(log)}")


def _stop_proc(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> None:
    """Stop one process this script started (by its pid only), escalating to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


# -- the environment: cluster + poolers --------------------------------------------------------


@dataclass
class Target:
    name: str
    host: str
    port: int
    proc: subprocess.Popen[Any] | None = None
    log: Path | None = None
    dead: str | None = None  # why it can no longer be measured
    dbname: str = DBNAME  # the database pgbench connects to through this target

    def alive(self) -> bool:
        if self.proc is None:
            return True
        if self.proc.poll() is not None and self.dead is None:
            self.dead = f"{self.name} exited with code {self.proc.returncode}"
        return self.dead is None


@dataclass
class Bench:
    args: argparse.Namespace
    cluster: TempCluster | None = None
    workdir: Path | None = None
    targets: dict[str, Target] = field(default_factory=dict)
    run_as: tuple[int, int] | None = None
    current: subprocess.Popen[Any] | None = None  # the pgbench running right now

    # ---- setup

    def start_cluster(self) -> TempCluster:
        """The throwaway cluster and the temp dir the poolers' files go in."""
        a = self.args
        print("starting PostgreSQL ...", flush=True)
        self.cluster = TempCluster(settings={"max_connections": max(200, max(a.clients) + 50)})
        self.cluster.start()
        c = self.cluster
        print(f"  PostgreSQL {c.version} on {c.host}:{c.port} ({c.bindir})", flush=True)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam(USER)
            self.run_as = (pw.pw_uid, pw.pw_gid)
        self.workdir = Path(tempfile.mkdtemp(prefix="tvproxy-bench-"))
        os.chmod(self.workdir, 0o755)
        if self.run_as:
            os.chown(self.workdir, *self.run_as)
        return c

    def start(self) -> None:
        a = self.args
        c = self.start_cluster()
        self.psql(c.port, "postgres", f"CREATE DATABASE {DBNAME}")
        print(f"pgbench -i -s {a.scale} ...", flush=True)
        self.run_checked(
            [
                self.pgbench,
                "-i",
                "-s",
                str(a.scale),
                "-q",
                "-h",
                c.host,
                "-p",
                str(c.port),
                "-U",
                USER,
                DBNAME,
            ],
            timeout=1800,
        )
        self.targets["direct"] = Target("direct", c.host, c.port)
        if "pgbouncer" in a.targets:
            self.start_pgbouncer()
        if "tvproxy" in a.targets:
            self.start_tvproxy()
        for t in self.targets.values():
            self.psql(t.port, DBNAME, "SELECT 1")

    @property
    def pgbench(self) -> str:
        assert self.cluster is not None
        p = Path(self.cluster.bin("pgbench"))
        return str(p) if p.is_file() else (shutil.which("pgbench") or "pgbench")

    def psql(self, port: int, db: str, sql: str, timeout: float = 60) -> str:
        assert self.cluster is not None
        return self.run_checked(
            [
                self.cluster.bin("psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.cluster.host,
                "-p",
                str(port),
                "-U",
                USER,
                "-d",
                db,
                "-c",
                sql,
            ],
            timeout=timeout,
        ).strip()

    def run_checked(self, argv: list[str], timeout: float) -> str:
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if p.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p.stdout

    def _spawn(self, argv: list[str], log: Path, as_postgres: bool) -> subprocess.Popen[Any]:
        kwargs: dict[str, Any] = {}
        if as_postgres and self.run_as:
            kwargs.update(user=self.run_as[0], group=self.run_as[1], extra_groups=[])
        env = _clean_env()
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(log, "ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.workdir),
                start_new_session=True,  # a terminal Ctrl-C reaches only us; we stop it in order
                **kwargs,
            )

    def start_pgbouncer(
        self, name: str = "pgbouncer", databases: tuple[str, ...] = (DBNAME,)
    ) -> Target:
        assert self.cluster is not None and self.workdir is not None
        exe = self.args.pgbouncer
        if not Path(exe).is_file():
            print("pgbouncer not found: apt-get install -y pgbouncer", flush=True)
            subprocess.run(["apt-get", "install", "-y", "pgbouncer"], check=True)
        d = self.workdir / name
        d.mkdir()
        port = free_port()
        (d / "userlist.txt").write_text(f'"{USER}" ""\n')
        log = d / "pgbouncer.log"
        ini = d / "pgbouncer.ini"
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    *(
                        f"{db} = host={self.cluster.host} port={self.cluster.port} "
                        f"dbname={db} user={USER}"
                        for db in databases
                    ),
                    "",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {port}",
                    f"unix_socket_dir = {d}",
                    "auth_type = trust",
                    f"auth_file = {d / 'userlist.txt'}",
                    f"admin_users = {USER}",
                    "pool_mode = transaction",
                    f"default_pool_size = {self.args.pool_size}",
                    f"max_client_conn = {self.args.max_client_conn}",
                    f"logfile = {log}",
                    f"pidfile = {d / 'pgbouncer.pid'}",
                    "ignore_startup_parameters = extra_float_digits",
                    "",
                ]
            )
        )
        for f in (d, *d.iterdir()):
            if self.run_as:
                os.chown(f, *self.run_as)
        stdout_log = d / "pgbouncer.stdout"
        proc = self._spawn([exe, str(ini)], stdout_log, as_postgres=True)
        # Registered before waiting, so that stop() finds it whatever happens next.
        self.targets[name] = t = Target(name, "127.0.0.1", port, proc, log, dbname=databases[0])
        _wait_port("127.0.0.1", port, proc, name, stdout_log)
        print(f"  PgBouncer on 127.0.0.1:{port} (pool size {self.args.pool_size})", flush=True)
        return t

    def start_tvproxy(
        self,
        name: str = "tvproxy",
        databases: tuple[str, ...] = (DBNAME,),
        tview: dict[str, Any] | None = None,
    ) -> Target:
        """tvproxy in front of the cluster; ``tview`` becomes its ``[tview]`` section."""
        assert self.cluster is not None and self.workdir is not None
        d = self.workdir / name
        d.mkdir()
        port = free_port()
        toml = d / "tvproxy.toml"
        toml.write_text(
            "\n".join(
                [
                    "[proxy]",
                    'listen_addr = "127.0.0.1"',
                    f"listen_port = {port}",
                    'pool_mode = "transaction"',
                    f"default_pool_size = {self.args.pool_size}",
                    f"max_client_conn = {self.args.max_client_conn}",
                    "",
                    "[auth]",
                    'auth_type = "trust"',
                    "",
                    "[admin]",
                    f'admin_users = ["{USER}"]',
                    "",
                    *(_toml_section("tview", tview) if tview is not None else []),
                    *(
                        line
                        for db in databases
                        for line in _toml_section(
                            f"databases.{db}",
                            {
                                "host": self.cluster.host,
                                "port": self.cluster.port,
                                "dbname": db,
                                "user": USER,
                            },
                        )
                    ),
                ]
            )
        )
        log = d / "tvproxy.log"
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "tvproxy",
                "serve",
                "-c",
                str(toml),
                "--log-json",
                "--log-level",
                self.args.tvproxy_log_level,
            ],
            log,
            as_postgres=False,
        )
        self.targets[name] = t = Target(name, "127.0.0.1", port, proc, log, dbname=databases[0])
        _wait_port("127.0.0.1", port, proc, name, log)
        print(f"  {name} on 127.0.0.1:{port} (pool size {self.args.pool_size})", flush=True)
        return t

    # ---- measuring

    def pgbench_run(
        self, target: Target, builtin: str, mode: str, clients: int, duration: int
    ) -> dict[str, Any]:
        return self.pgbench_exec(target, [f"-{builtin}"], mode, clients, duration)

    def pgbench_exec(
        self, target: Target, workload: list[str], mode: str, clients: int, duration: int
    ) -> dict[str, Any]:
        """One pgbench -T run; ``workload`` is ``["-S"]``, ``["-f", script, "-D", ...]``, ..."""
        assert self.cluster is not None
        argv = [
            self.pgbench,
            *workload,
            "-n",
            "-M",
            mode,
            "-c",
            str(clients),
            "-j",
            str(min(self.args.jobs, clients)),
            "-T",
            str(duration),
            "-h",
            target.host,
            "-p",
            str(target.port),
            "-U",
            USER,
            target.dbname,
        ]
        started = time.time()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            self.current = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_clean_env(),
                start_new_session=True,
            )
            timed_out = False
            try:
                rc = self.current.wait(timeout=duration + self.args.grace)
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop_proc(self.current, signal.SIGINT)
                rc = self.current.returncode
            except BaseException:  # Ctrl-C / SIGTERM: this pgbench is in its own session
                _stop_proc(self.current, signal.SIGINT)
                raise
            finally:
                self.current = None
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        m = _TPS_RE.search(stdout)
        failed = _FAILED_RE.search(stdout)
        res: dict[str, Any] = {
            "target": target.name,
            "tps": float(m.group(1)) if m else None,
            "latency_ms": float(lm.group(1)) if (lm := _LAT_RE.search(stdout)) else None,
            "transactions": int(xm.group(1)) if (xm := _XACTS_RE.search(stdout)) else None,
            "failed_transactions": int(failed.group(1)) if failed else None,
            "retried": int(rm.group(1)) if (rm := _RETRIED_RE.search(stdout)) else None,
            "returncode": rc,
            "wall_s": round(time.time() - started, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "command": " ".join(argv),
        }
        problems = []
        if timed_out:
            problems.append(f"pgbench did not finish within {duration + self.args.grace}s")
        if rc != 0:
            problems.append(f"pgbench exit code {rc}")
        if res["tps"] is None:
            problems.append("no tps line in pgbench output")
        if res["failed_transactions"]:
            problems.append(f"{res['failed_transactions']} failed transactions")
        if "aborted" in stderr or "error" in stderr.lower():
            problems.append("errors on pgbench stderr")
        if problems:
            res["error"] = "; ".join(problems)
            res["stderr_tail"] = "\n".join(stderr.splitlines()[-30:])
            res["stdout_tail"] = "\n".join(stdout.splitlines()[-30:])
            if target.log is not None:
                res["server_log_tail"] = _tail(target.log, 60)
        return res

    def measure(self) -> list[dict[str, Any]]:
        a = self.args
        workloads: list[dict[str, Any]] = []
        combos = [(b, m, c) for b in a.builtins for m in a.modes for c in a.clients]
        for i, (builtin, mode, clients) in enumerate(combos, 1):
            w: dict[str, Any] = {
                "builtin": f"-{builtin}",
                "workload": BUILTINS[builtin],
                "mode": mode,
                "clients": clients,
                "jobs": min(a.jobs, clients),
                "runs": {t: [] for t in self.targets},
                "status": {},
            }
            print(f"\n[{i}/{len(combos)}] pgbench -{builtin} -M {mode} -c {clients}", flush=True)
            active = []
            for name, t in self.targets.items():
                if name == "pgbouncer" and mode == "prepared":
                    w["status"][name] = UNSUPPORTED
                    w["runs"][name] = []
                    print(
                        f"  {name:9s} {UNSUPPORTED}: PgBouncer < 1.21 has no prepared "
                        "statements in transaction mode",
                        flush=True,
                    )
                else:
                    active.append(t)
            if a.warmup > 0:
                for t in active:
                    if t.alive():
                        self.pgbench_run(t, builtin, mode, clients, a.warmup)
            for r in range(1, a.runs + 1):
                for t in active:
                    if not t.alive():
                        w["runs"][t.name].append(
                            {
                                "target": t.name,
                                "tps": None,
                                "error": t.dead,
                                "server_log_tail": _tail(t.log, 60),
                            }
                        )
                        print(f"  run {r} {t.name:9s} skipped: {t.dead}", flush=True)
                        continue
                    res = self.pgbench_run(t, builtin, mode, clients, a.duration)
                    res["run"] = r
                    w["runs"][t.name].append(res)
                    if res.get("error"):
                        print(
                            f"  run {r} {t.name:9s} ERROR {res['error']}\n"
                            f"{_indent(res.get('stderr_tail', ''))}",
                            flush=True,
                        )
                    else:
                        print(
                            f"  run {r} {t.name:9s} {res['tps']:10.1f} tps  "
                            f"{res['latency_ms']:.3f} ms",
                            flush=True,
                        )
            summarize(w, list(self.targets))
            print("  " + _summary_line(w), flush=True)
            workloads.append(w)
        return workloads

    # ---- teardown

    def stop(self) -> None:
        # A second Ctrl-C must not cut the cleanup short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _stop_proc(self.current, signal.SIGINT)
        for t in reversed(list(self.targets.values())):
            # SIGINT: PgBouncer's and tvproxy's "finish transactions, then exit".
            _stop_proc(t.proc, signal.SIGINT)
        if self.cluster is not None:
            self.cluster.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # ---- machine info

    def machine(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "cpu_model": _cpu_model(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "python_implementation": platform.python_implementation(),
        }
        with contextlib.suppress(Exception):
            assert self.cluster is not None
            info["postgresql"] = self.psql(self.cluster.port, "postgres", "SELECT version()")
        with contextlib.suppress(Exception):
            info["pgbench"] = self.run_checked([self.pgbench, "--version"], 10).strip()
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [self.args.pgbouncer, "--version"], capture_output=True, text=True, timeout=10
            ).stdout
            info["pgbouncer"] = out.splitlines()[0].strip()
        with contextlib.suppress(Exception):
            import tvproxy

            info["tvproxy"] = getattr(tvproxy, "__version__", "?")
        with contextlib.suppress(Exception):
            info["tvproxy_commit"] = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "tvproxy"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            info["tvproxy_tree_dirty"] = bool(dirty)
        for mod in ("uvloop", "structlog", "pglast"):
            with contextlib.suppress(Exception):
                from importlib.metadata import version

                info[mod] = version(mod)
        return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _indent(s: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in s.splitlines())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _toml_section(name: str, values: dict[str, Any]) -> list[str]:
    return [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items()), ""]


def install_signal_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt, so cleanup runs."""

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then leaves it so.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)


def report_failure(bench: Bench, exc: BaseException) -> None:
    """A failed setup or run: say why, with the poolers' and PostgreSQL's log tails."""
    print(f"\nbenchmark failed: {exc}", file=sys.stderr, flush=True)
    for t in bench.targets.values():
        if t.log is not None:
            print(f"--- {t.name} log tail:\n{_tail(t.log)}", file=sys.stderr)
    if bench.cluster is not None:
        print(f"--- PostgreSQL log tail:\n{bench.cluster.log_tail()}", file=sys.stderr)


# -- statistics and reporting -------------------------------------------------------------------


def summarize(w: dict[str, Any], targets: list[str]) -> None:
    med: dict[str, float | None] = {}
    for t in targets:
        if w["status"].get(t) == UNSUPPORTED:
            med[t] = None
            continue
        ok = [r["tps"] for r in w["runs"][t] if r.get("tps") is not None and not r.get("error")]
        errs = sum(1 for r in w["runs"][t] if r.get("error"))
        med[t] = round(statistics.median(ok), 1) if ok else None
        w["status"][t] = "ok" if not errs else f"{errs}/{len(w['runs'][t])} runs failed"
    w["median_tps"] = med

    def ratio(a: str, b: str) -> float | None:
        x, y = med.get(a), med.get(b)
        return round(x / y, 3) if x and y else None

    w["ratios"] = {
        "tvproxy/pgbouncer": ratio("tvproxy", "pgbouncer"),
        "tvproxy/direct": ratio("tvproxy", "direct"),
        "pgbouncer/direct": ratio("pgbouncer", "direct"),
    }
    # Same-round pairs too: each run of tvproxy divided by the PgBouncer run just before it.
    paired = []
    for a, b in zip(w["runs"].get("tvproxy", []), w["runs"].get("pgbouncer", []), strict=False):
        if a.get("tps") and b.get("tps") and not a.get("error") and not b.get("error"):
            paired.append(a["tps"] / b["tps"])
    w["ratios"]["tvproxy/pgbouncer_paired_median"] = (
        round(statistics.median(paired), 3) if paired else None
    )


def _fmt_tps(w: dict[str, Any], t: str) -> str:
    st = w["status"].get(t)
    if st == UNSUPPORTED:
        return UNSUPPORTED
    v = w["median_tps"].get(t)
    s = f"{v:,.0f}" if v is not None else "—"
    if st and st != "ok":
        s += f" ({st})"
    return s


def _fmt_ratio(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "—"


def _summary_line(w: dict[str, Any]) -> str:
    parts = [f"{t}={_fmt_tps(w, t)}" for t in w["median_tps"]]
    r = w["ratios"]
    return (
        ", ".join(parts) + f" | tvproxy/pgbouncer={_fmt_ratio(r['tvproxy/pgbouncer'])}"
        f" tvproxy/direct={_fmt_ratio(r['tvproxy/direct'])}"
    )


def render_md(report: dict[str, Any]) -> str:
    a = report["settings"]
    m = report["machine"]
    targets = report["targets"]
    lines = [
        f"# pgbench: direct vs PgBouncer vs tvproxy — {report['started_at']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Same PostgreSQL for all three (throwaway cluster, `pgbench -i -s {a['scale']}`, "
        f"fsync off); poolers in transaction mode with pool size {a['pool_size']}, trust auth, "
        f"all on 127.0.0.1. Each cell is the median TPS of {a['runs']} runs of "
        f"{a['duration']} s, targets interleaved (direct, pgbouncer, tvproxy, ...), "
        f"`-j {a['jobs']}`, warm-up {a['warmup']} s per target and workload (not counted).",
        "",
        "| workload | mode | clients | "
        + " | ".join(targets)
        + " | tvproxy/PgBouncer | tvproxy/direct |",
        "|---|---|---:|" + "---:|" * len(targets) + "---:|---:|",
    ]
    for w in report["workloads"]:
        r = w["ratios"]
        tvpgb = _fmt_ratio(r["tvproxy/pgbouncer"])
        if w["status"].get("pgbouncer") == UNSUPPORTED:
            tvpgb = "n/a"
        lines.append(
            f"| {w['builtin']} | {w['mode']} | {w['clients']} | "
            + " | ".join(_fmt_tps(w, t) for t in targets)
            + f" | {tvpgb} | {_fmt_ratio(r['tvproxy/direct'])} |"
        )
    lines += [
        "",
        "Ratios are of the medians. PgBouncer 1.18 has no protocol-level prepared statements "
        "in transaction mode (added in 1.21), so `-M prepared` is not run through it.",
        "",
        "## Raw TPS per run",
        "",
        "| workload | mode | clients | target | runs (TPS) | median |",
        "|---|---|---:|---|---|---:|",
    ]
    for w in report["workloads"]:
        for t in targets:
            runs = w["runs"].get(t, [])
            if w["status"].get(t) == UNSUPPORTED:
                cells = UNSUPPORTED
            else:
                cells = ", ".join(
                    ("ERR" if r.get("error") else f"{r['tps']:,.0f}")
                    if r.get("tps") is not None
                    else "ERR"
                    for r in runs
                )
            lines.append(
                f"| {w['builtin']} | {w['mode']} | {w['clients']} | {t} | {cells} | "
                f"{_fmt_tps(w, t)} |"
            )
    errors = [
        (w, r)
        for w in report["workloads"]
        for t in targets
        for r in w["runs"].get(t, [])
        if r.get("error")
    ]
    if errors:
        lines += ["", "## Errors", ""]
        for w, r in errors:
            lines += [
                f"### {r['target']}: pgbench {w['builtin']} -M {w['mode']} -c {w['clients']}"
                f" run {r.get('run', '?')}",
                "",
                f"{r['error']}",
                "",
                "pgbench stderr (tail):",
                "",
                "```",
                r.get("stderr_tail", "").rstrip() or "(empty)",
                "```",
            ]
            if r.get("server_log_tail"):
                lines += [
                    "",
                    f"{r['target']} log (tail):",
                    "",
                    "```",
                    r["server_log_tail"].rstrip(),
                    "```",
                ]
            lines.append("")
    lines += ["", "## Machine", ""]
    for k, v in m.items():
        lines.append(f"- {k}: {v}")
    loads = [
        r["loadavg_1m_after"]
        for w in report["workloads"]
        for rs in w["runs"].values()
        for r in rs
        if r.get("loadavg_1m_after") is not None
    ]
    if loads:
        lines.append(
            f"- 1-minute load average after each run: {min(loads):.2f} to {max(loads):.2f} "
            f"(median {statistics.median(loads):.2f}) on {m.get('nproc')} CPUs"
        )
    if report.get("chart"):
        lines += ["", f"![chart]({report['chart']})"]
    lines.append("")
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    targets = report["targets"]
    ws = report["workloads"]
    labels = [f"{w['builtin']} {w['mode']}\nc={w['clients']}" for w in ws]
    width = 0.8 / max(1, len(targets))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ws)), 4.5))
    for i, t in enumerate(targets):
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(ws))]
        ys = [w["median_tps"].get(t) or 0 for w in ws]
        ax.bar(xs, ys, width, label=t)
    ax.set_xticks(range(len(ws)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("TPS (median)")
    ax.set_title("pgbench: direct vs PgBouncer vs tvproxy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------------


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {s}") from e
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"need positive integers: {s}")
    return out


def _choice_list(choices: tuple[str, ...]):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}: {s}")
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="pgbench against direct PostgreSQL, PgBouncer and tvproxy, interleaved.",
    )
    p.add_argument(
        "-S",
        dest="select_only",
        action="store_true",
        help="run the select-only builtin (default: both -S and -N)",
    )
    p.add_argument(
        "-N",
        dest="simple_update",
        action="store_true",
        help="run the simple-update builtin (default: both -S and -N)",
    )
    p.add_argument(
        "--modes",
        type=_choice_list(MODES),
        default=list(MODES),
        help="query modes, comma-separated (default simple,extended,prepared)",
    )
    p.add_argument(
        "--clients",
        type=_int_list,
        default=[16],
        help="client counts, comma-separated (default 16)",
    )
    p.add_argument("-j", "--jobs", type=int, default=2, help="pgbench threads (default 2)")
    p.add_argument(
        "--pool-size",
        type=int,
        default=16,
        help="server pool size, the same for both poolers (default 16)",
    )
    p.add_argument("--max-client-conn", type=int, default=500)
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="repetitions per target (default 3)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="uncounted warm-up seconds per target and workload (default 2; 0 = none)",
    )
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument(
        "--targets",
        type=_choice_list(TARGETS),
        default=list(TARGETS),
        help="subset of direct,pgbouncer,tvproxy (default all)",
    )
    p.add_argument("--pgbouncer", default="/usr/sbin/pgbouncer", help="PgBouncer binary")
    p.add_argument(
        "--tvproxy-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    p.add_argument(
        "--grace",
        type=int,
        default=60,
        help="seconds past --duration before a stuck pgbench is stopped (default 60)",
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rewrite the Markdown (and chart) of an existing results JSON, then exit",
    )
    return p


def write_reports(report: dict[str, Any], out: Path, stamp: str, chart: bool) -> Path:
    """Write <stamp>-pgbench.{json,md,png} and latest.md; return the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stamp}-pgbench.png"
    report.pop("chart", None)
    if chart and render_chart(report, png):
        report["chart"] = png.name
    (out / f"{stamp}-pgbench.json").write_text(json.dumps(report, indent=2) + "\n")
    md_text = render_md(report)
    md = out / f"{stamp}-pgbench.md"
    md.write_text(md_text)
    (out / "latest.md").write_text(md_text)
    return md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        md = write_reports(report, args.render.parent, report["started_at"], not args.no_chart)
        print(md.read_text())
        return 0
    args.builtins = [b for b, on in (("S", args.select_only), ("N", args.simple_update)) if on]
    if not args.builtins:
        args.builtins = ["S", "N"]
    if "direct" not in args.targets:
        args.targets = ["direct", *args.targets]  # the cluster is always there; ratios need it
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)

    install_signal_handlers()
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    bench = Bench(args)
    try:
        bench.start()
        machine = bench.machine()
        workloads = bench.measure()
        # A pooler that died during the run: keep its log tail in the report.
        crashed = {
            n: _tail(t.log, 60)
            for n, t in bench.targets.items()
            if t.proc is not None and not t.alive()
        }
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr, flush=True)
        bench.stop()
        return 130
    except BaseException as e:
        report_failure(bench, e)
        bench.stop()
        return 1
    bench.stop()

    report: dict[str, Any] = {
        "started_at": stamp,
        "finished_at": dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "command": command,
        "settings": {
            "builtins": [f"-{b}" for b in args.builtins],
            "modes": args.modes,
            "clients": args.clients,
            "jobs": args.jobs,
            "pool_size": args.pool_size,
            "pool_mode": "transaction",
            "max_client_conn": args.max_client_conn,
            "duration": args.duration,
            "runs": args.runs,
            "warmup": args.warmup,
            "scale": args.scale,
            "order": "interleaved: " + ", ".join(args.targets) + ", repeated per run",
        },
        "targets": list(args.targets),
        "machine": machine,
        "workloads": workloads,
    }
    if crashed:
        report["crashed"] = crashed
    md = write_reports(report, args.out_dir, stamp, not args.no_chart)
    print("\n" + md.read_text())
    print(f"wrote {args.out_dir}/{stamp}-pgbench.{{json,md}} and {args.out_dir / 'latest.md'}")
    if report.get("chart"):
        print(f"wrote {args.out_dir / report['chart']}")
    else:
        print("(no chart: matplotlib not importable, or --no-chart)")
    bad = any(r.get("error") for w in workloads for rs in w["runs"].values() for r in rs)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
