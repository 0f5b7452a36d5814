#!/usr/bin/env python3
"""TVIEW write overhead, side by side in one run: tvproxy with TVIEWs vs without, vs per-row
refresh triggers in PostgreSQL, with direct PostgreSQL and PgBouncer for reference.

    python bench/tview.py                                  # defaults: about 4-5 minutes
    python bench/tview.py --duration 10 --runs 5 --clients 8,16 --modes simple,extended,prepared
    python bench/tview.py --workloads same-row-x10 --b-targets tvproxy-on,triggers,tvproxy-off

Data: fixture F of shared/scenarios/tviews.md scaled up (default 1000 companies, 10000 users,
50000 posts, 100000 comments), with indexes on the tb_ foreign keys and the user's email in
tv_user.data (so that ``UPDATE tb_user SET email`` changes the read model). Loaded once into a
template database and copied into three databases, so all of them start identical:

- ``tview``: TVIEWs tv_company, tv_user, tv_post declared through tvproxy (``CREATE TABLE tv_x AS
  SELECT ...``); written only through ``tvproxy-on`` (``[tview] enabled = true``).
- ``plain``: the same TVIEWs declared the same way, but written only by ``direct``, ``pgbouncer``
  and ``tvproxy-off`` (``[tview] enabled = false``): nothing refreshes them (no refresh at all).
- ``trig``: the same v_/tv_ objects created with plain SQL, kept fresh by per-row plpgsql
  AFTER INSERT/UPDATE/DELETE triggers on the four tb_ tables (the way pg_tviews runs them:
  upsert from v_x at once, for each modified row, and cascade to the dependents); written by
  ``triggers`` (direct connections).

Workloads (pgbench custom scripts, ``-D`` sets the key ranges):

- ``write-txn`` (A): ``BEGIN; UPDATE tb_post ... WHERE pk_post = :x; UPDATE tb_user SET email
  ... WHERE pk_user = :y; END`` on random keys.
- ``autocommit`` (A): ``UPDATE tb_post ... WHERE pk_post = :x`` outside a transaction block (the
  proxy wraps it in BEGIN ... refresh + COMMIT).
- ``same-row-x10`` (B): ``BEGIN; 10 x UPDATE tb_user SET email ... WHERE pk_user = :x; END``.

Every (workload, query mode, client count) cell runs an uncounted warm-up per target, then
``--runs`` rounds in which every target runs once for ``--duration`` seconds (the order rotates
from round to round). Reported: median TPS and latency per target, ratios of the medians
(headline: tvproxy-on / tvproxy-off), the median of same-round on/off ratios, the refresh work
per transaction (tvproxy's SHOW TVIEW STATS, tv_ row writes from pg_stat_user_tables), and the
oracle after the run (tv_x EXCEPT v_x and back, per database).

Results: ``bench/results/<UTC timestamp>-tview.json`` and ``.md``, copied to
``bench/results/latest-tview.md`` (bench/run.py's ``latest.md`` stays the pgbench one).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# bench/ is not a package: importing run.py by its directory works for `python bench/tview.py`
# and for `python -m` alike.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    MODES,
    REPO,
    UNSUPPORTED,
    USER,
    Bench,
    BenchError,
    Target,
    _choice_list,
    _fmt_ratio,
    _indent,
    _int_list,
    _tail,
    install_signal_handlers,
    report_failure,
)

TARGETS = ("direct", "pgbouncer", "tvproxy-off", "tvproxy-on", "triggers")
WORKLOADS = ("write-txn", "autocommit", "same-row-x10")
TVIEWS = ("company", "user", "post")
DB_TVIEW, DB_PLAIN, DB_TRIG, DB_TEMPLATE = "tview", "plain", "trig", "fixture"
TARGET_DB = {
    "direct": DB_PLAIN,
    "pgbouncer": DB_PLAIN,
    "tvproxy-off": DB_PLAIN,
    "tvproxy-on": DB_TVIEW,
    "triggers": DB_TRIG,
}
TARGET_DESC = {
    "direct": "PostgreSQL directly (db plain, nothing refreshes the tv_ tables)",
    "pgbouncer": "PgBouncer, transaction pooling (db plain, no refresh)",
    "tvproxy-off": "tvproxy with [tview] enabled = false (db plain, no capture, no refresh)",
    "tvproxy-on": "tvproxy with TVIEWs, [tview] enabled = true (db tview, refresh at COMMIT)",
    "triggers": "PostgreSQL directly, per-row plpgsql refresh triggers (db trig)",
}

# -- schema and data ------------------------------------------------------------------------------

# Fixture F (shared/scenarios/tviews.md), plus indexes on the foreign keys (the views' joins and
# the comment aggregate would scan otherwise; any real schema has them).
FIXTURE_DDL = """
CREATE TABLE tb_company (pk_company BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  name TEXT NOT NULL);
CREATE TABLE tb_user (pk_user BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  fk_company BIGINT NOT NULL REFERENCES tb_company, name TEXT NOT NULL, email TEXT);
CREATE TABLE tb_post (pk_post BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  fk_user BIGINT NOT NULL REFERENCES tb_user, title TEXT NOT NULL);
CREATE TABLE tb_comment (pk_comment BIGINT PRIMARY KEY,
  id UUID NOT NULL DEFAULT gen_random_uuid(), fk_post BIGINT NOT NULL REFERENCES tb_post, text TEXT);
CREATE INDEX ON tb_user (fk_company);
CREATE INDEX ON tb_post (fk_user);
CREATE INDEX ON tb_comment (fk_post);
"""

FIXTURE_DATA = """
INSERT INTO tb_company SELECT g, gen_random_uuid(), 'company ' || g
  FROM generate_series(1, {companies}) g;
INSERT INTO tb_user SELECT g, gen_random_uuid(), 1 + (g - 1) % {companies}, 'user ' || g,
       'user' || g || '@example.com'
  FROM generate_series(1, {users}) g;
INSERT INTO tb_post SELECT g, gen_random_uuid(), 1 + (g - 1) % {users}, 'post ' || g
  FROM generate_series(1, {posts}) g;
INSERT INTO tb_comment SELECT g, gen_random_uuid(), 1 + (g - 1) % {posts}, 'comment ' || g
  FROM generate_series(1, {comments}) g;
"""

# The TVIEW SELECTs of fixture F, with 'email' in tv_user.data (and so in tv_post's author).
TVIEW_SELECTS = {
    "company": """SELECT pk_company, id, jsonb_build_object('id', id, 'name', name) AS data
  FROM tb_company""",
    "user": """SELECT u.pk_user, u.id, u.fk_company, v_company.id AS company_id,
       jsonb_build_object('id', u.id, 'name', u.name, 'email', u.email,
                          'company', v_company.data) AS data
  FROM tb_user u JOIN v_company ON v_company.pk_company = u.fk_company""",
    "post": """SELECT p.pk_post, p.id, p.fk_user, v_user.id AS user_id,
       jsonb_build_object('id', p.id, 'title', p.title, 'author', v_user.data,
         'comments', COALESCE((SELECT jsonb_agg(jsonb_build_object('id', c.pk_comment,
                                                                   'text', c.text)
                                                ORDER BY c.pk_comment)
                                 FROM tb_comment c WHERE c.fk_post = p.pk_post), '[]'::jsonb))
         AS data
  FROM tb_post p JOIN v_user ON v_user.pk_user = p.fk_user""",
}
TVIEW_FKS = {"company": (), "user": ("fk_company",), "post": ("fk_user",)}
TVIEW_COLUMNS = {
    "company": ("id", "data"),
    "user": ("id", "fk_company", "company_id", "data"),
    "post": ("id", "fk_user", "user_id", "data"),
}


def tview_ddl(entity: str) -> str:
    """The statement run through tvproxy to declare one TVIEW."""
    return f"CREATE TABLE tv_{entity} AS\n{TVIEW_SELECTS[entity]}"


def _upsert(entity: str, where: str) -> str:
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in TVIEW_COLUMNS[entity])
    return (
        f"INSERT INTO tv_{entity} SELECT * FROM v_{entity} WHERE {where}\n"
        f"    ON CONFLICT (pk_{entity}) DO UPDATE SET {sets};"
    )


def trigger_sql() -> str:
    """The in-database baseline: the same v_/tv_ objects as tvproxy creates (view, table from
    the view's columns, primary key, fk_ indexes, GIN on data), kept fresh by per-row AFTER
    triggers on the tb_ tables that refresh at once, the way pg_tviews' wired engine does:
    for every modified row, upsert the tv row(s) from v_x (full replacement, no IS DISTINCT
    FROM), delete a tv row whose source vanished, and cascade to the dependents (tv_user of a
    company, tv_post of a user or of a comment's post, old and new parent when a key moves)."""
    parts = []
    for e in TVIEWS:
        parts += [
            f"CREATE VIEW v_{e} AS {TVIEW_SELECTS[e]};",
            f"CREATE TABLE tv_{e} AS SELECT * FROM v_{e} WITH NO DATA;",
            f"ALTER TABLE tv_{e} ADD PRIMARY KEY (pk_{e});",
            *(f"CREATE INDEX ON tv_{e} ({fk});" for fk in TVIEW_FKS[e]),
            f"CREATE INDEX ON tv_{e} USING gin (data);",
            f"INSERT INTO tv_{e} SELECT * FROM v_{e};",
        ]

    def self_refresh(e: str) -> str:
        return f"""  {_upsert(e, f"pk_{e} = p")}
  IF NOT FOUND THEN DELETE FROM tv_{e} WHERE pk_{e} = p; END IF;"""

    parts.append(f"""
CREATE FUNCTION tvt_refresh_post(p bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
{self_refresh("post")}
END $$;
CREATE FUNCTION tvt_refresh_user(p bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
{self_refresh("user")}
  -- cascade: the posts of this user embed v_user.data
  {_upsert("post", "fk_user = p")}
END $$;
CREATE FUNCTION tvt_refresh_company(p bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
{self_refresh("company")}
  -- cascade: the users of this company embed v_company.data, their posts embed v_user.data
  {_upsert("user", "fk_company = p")}
  {_upsert("post", "fk_user IN (SELECT pk_user FROM tb_user WHERE fk_company = p)")}
END $$;""")
    # (table, refresh function, column whose OLD and NEW values are refreshed)
    for table, fn, col in (
        ("tb_company", "tvt_refresh_company", "pk_company"),
        ("tb_user", "tvt_refresh_user", "pk_user"),
        ("tb_post", "tvt_refresh_post", "pk_post"),
        ("tb_comment", "tvt_refresh_post", "fk_post"),  # a comment refreshes its post(s)
    ):
        parts.append(f"""
CREATE FUNCTION tvt_on_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.{col} IS DISTINCT FROM NEW.{col}) THEN
    PERFORM {fn}(OLD.{col});
  END IF;
  IF TG_OP <> 'DELETE' THEN
    PERFORM {fn}(NEW.{col});
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER tvt_{table} AFTER INSERT OR UPDATE OR DELETE ON {table}
  FOR EACH ROW EXECUTE FUNCTION tvt_on_{table}();""")
    return "\n".join(parts)


# -- workloads ------------------------------------------------------------------------------------


def scripts() -> dict[str, str]:
    """pgbench scripts; :nposts / :nusers come from -D. Every UPDATE writes a new value, so
    every refresh changes the read model (no skipped no-op rows on either side)."""
    x10 = "\n".join(
        f"UPDATE tb_user SET email = 'u' || :r || '-{i}@example.com' WHERE pk_user = :x;"
        for i in range(1, 11)
    )
    return {
        "write-txn": """\\set x random(1, :nposts)
\\set y random(1, :nusers)
\\set r random(1, 1000000000)
BEGIN;
UPDATE tb_post SET title = 'title ' || :r WHERE pk_post = :x;
UPDATE tb_user SET email = 'u' || :r || '@example.com' WHERE pk_user = :y;
END;
""",
        "autocommit": """\\set x random(1, :nposts)
\\set r random(1, 1000000000)
UPDATE tb_post SET title = 'title ' || :r WHERE pk_post = :x;
""",
        "same-row-x10": f"""\\set x random(1, :nusers)
\\set r random(1, 1000000000)
BEGIN;
{x10}
END;
""",
    }


WORKLOAD_DESC = {
    "write-txn": "A: BEGIN; UPDATE tb_post (random pk); UPDATE tb_user SET email (random pk); END",
    "autocommit": "A: UPDATE tb_post (random pk) in autocommit",
    "same-row-x10": "B: BEGIN; 10 x UPDATE tb_user SET email on one random pk; END",
}


# -- CPU accounting (Linux /proc) -----------------------------------------------------------------

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int, children: bool = False) -> float:
    """utime + stime of one process in seconds (+ its waited-for children's)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / _HZ


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds used so far by this cluster: the postmaster, its live children (backends,
    autovacuum, ...) and the children that already exited (counted in its cutime/cstime).
    Other PostgreSQL clusters on the machine are not counted."""
    total = _proc_cpu(postmaster, children=True)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                total += _proc_cpu(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return total


# -- the bench ------------------------------------------------------------------------------------


class TviewBench(Bench):
    """bench/run.py's Bench (cluster, poolers, pgbench runs, cleanup) with the TVIEW setup."""

    def start(self) -> None:
        a = self.args
        c = self.start_cluster()
        assert self.workdir is not None
        t0 = time.monotonic()
        self.psql(c.port, "postgres", f"CREATE DATABASE {DB_TEMPLATE}")
        print(
            f"fixture F x: {a.companies} companies, {a.users} users, {a.posts} posts, "
            f"{a.comments} comments ...",
            flush=True,
        )
        self.psql(c.port, DB_TEMPLATE, FIXTURE_DDL)
        self.psql(c.port, DB_TEMPLATE, FIXTURE_DATA.format(**vars(a)), timeout=1800)
        for db in (DB_TVIEW, DB_PLAIN, DB_TRIG):
            self.psql(c.port, "postgres", f"CREATE DATABASE {db} TEMPLATE {DB_TEMPLATE}")
        print("trigger baseline in db trig ...", flush=True)
        self.psql(c.port, DB_TRIG, trigger_sql(), timeout=1800)

        need = set(a.targets) | set(a.b_targets)
        on = self.start_tvproxy(
            "tvproxy-on", (DB_TVIEW, DB_PLAIN), {"enabled": True, "schema": "tvproxy"}
        )
        print("TVIEWs through tvproxy-on (CREATE TABLE tv_x AS SELECT ...) ...", flush=True)
        self.ddl_results: dict[str, list[str]] = {}
        for db in (DB_TVIEW, DB_PLAIN):
            for e in TVIEWS:
                out = self.psql(on.port, db, tview_ddl(e), timeout=1800)
                self.ddl_results.setdefault(db, []).append(f"tv_{e}: {out or 'ok'}")
        if "tvproxy-off" in need:
            self.start_tvproxy("tvproxy-off", (DB_PLAIN,), {"enabled": False})
        if "pgbouncer" in need:
            self.start_pgbouncer("pgbouncer", (DB_PLAIN,))
        self.targets["direct"] = Target("direct", c.host, c.port, dbname=DB_PLAIN)
        self.targets["triggers"] = Target("triggers", c.host, c.port, dbname=DB_TRIG)
        for db in (DB_TVIEW, DB_PLAIN, DB_TRIG):
            self.psql(c.port, db, "VACUUM ANALYZE", timeout=1800)
        for name in TARGETS:
            t = self.targets.get(name)
            if t is not None:
                self.psql(t.port, t.dbname, "SELECT 1")
        self.script_files: dict[str, Path] = {}
        for name, text in scripts().items():
            path = self.workdir / f"{name}.sql"
            path.write_text(text)
            path.chmod(0o644)
            self.script_files[name] = path
        self.setup_s = round(time.monotonic() - t0, 1)
        self.oracle_before = self.oracle()
        print(f"setup done in {self.setup_s}s; oracle: {_oracle_line(self.oracle_before)}")

    # ---- observations

    def oracle(
        self, dbs: tuple[str, ...] = (DB_TVIEW, DB_TRIG, DB_PLAIN)
    ) -> dict[str, dict[str, int]]:
        """Rows differing between tv_x and v_x (both ways), per database and TVIEW."""
        assert self.cluster is not None
        out: dict[str, dict[str, int]] = {}
        for db in dbs:
            out[db] = {}
            for e in TVIEWS:
                cols = ", ".join((f"pk_{e}", *TVIEW_COLUMNS[e]))
                sql = (
                    f"SELECT count(*) FROM ((SELECT {cols} FROM tv_{e} EXCEPT "
                    f"SELECT {cols} FROM v_{e}) UNION ALL (SELECT {cols} FROM v_{e} EXCEPT "
                    f"SELECT {cols} FROM tv_{e})) d"
                )
                out[db][f"tv_{e}"] = int(self.psql(self.cluster.port, db, sql, timeout=600))
        return out

    def stale_rows(self, dbs: tuple[str, ...] = (DB_TVIEW, DB_TRIG)) -> dict[str, dict[str, int]]:
        """The cheaper check run after every cell: keys whose tv_x row is missing, extra or
        different from v_x (one evaluation of the view, a hash full join on the key)."""
        assert self.cluster is not None
        out: dict[str, dict[str, int]] = {}
        for db in dbs:
            out[db] = {}
            for e in TVIEWS:
                pk = f"pk_{e}"
                old = ", ".join(f"t.{c}" for c in TVIEW_COLUMNS[e])
                new = ", ".join(f"v.{c}" for c in TVIEW_COLUMNS[e])
                sql = (
                    f"SELECT count(*) FROM tv_{e} t FULL JOIN v_{e} v ON t.{pk} = v.{pk} "
                    f"WHERE t.{pk} IS NULL OR v.{pk} IS NULL OR ROW({old}) IS DISTINCT FROM "
                    f"ROW({new})"
                )
                out[db][f"tv_{e}"] = int(self.psql(self.cluster.port, db, sql, timeout=600))
        return out

    def tv_writes(self) -> dict[str, dict[str, int]]:
        """Row writes (ins + upd + del) so far on each tv_ table, per database."""
        assert self.cluster is not None
        out: dict[str, dict[str, int]] = {}
        for db in (DB_TVIEW, DB_TRIG, DB_PLAIN):
            rows = self.psql(
                self.cluster.port,
                db,
                "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                "WHERE relname LIKE 'tv\\_%' ORDER BY 1",
            )
            out[db] = {r.split("|")[0]: int(r.split("|")[1]) for r in rows.splitlines() if r}
        return out

    def admin(self, t: Target, command: str) -> str:
        """One command on a tvproxy's admin console; CSV with a header line."""
        assert self.cluster is not None
        return self.run_checked(
            [
                self.cluster.bin("psql"),
                "-X",
                "--csv",
                "-h",
                t.host,
                "-p",
                str(t.port),
                "-U",
                USER,
                "-d",
                "tvproxy",
                "-c",
                command,
            ],
            timeout=30,
        )

    def flush_pool_stats(self) -> None:
        """Close tvproxy-on's idle server connections to db tview (admin RECONNECT) and wait
        until those backends are gone: a backend flushes its table statistics when it exits,
        whereas an idle pooled one may keep them pending for seconds (db trig is written by
        pgbench's own backends, which exit). The next warm-up reconnects."""
        assert self.cluster is not None
        t = self.targets.get("tvproxy-on")
        if t is None or not t.alive():
            return
        self.admin(t, f"RECONNECT {DB_TVIEW}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n = int(
                self.psql(
                    self.cluster.port,
                    "postgres",
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    f" AND datname = '{DB_TVIEW}' AND query NOT ILIKE 'LISTEN%'",
                )
            )
            if n == 0:
                return
            time.sleep(0.1)

    def tview_stats(self) -> dict[str, dict[str, int]]:
        """tvproxy-on's SHOW TVIEW STATS for db tview (numeric columns), per tview ('*' = all)."""
        t = self.targets.get("tvproxy-on")
        if t is None or not t.alive():
            return {}
        text = self.admin(t, "SHOW TVIEW STATS")
        out: dict[str, dict[str, int]] = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("database") != DB_TVIEW:
                continue
            out[row["tview"]] = {
                k: int(v) for k, v in row.items() if v and v.lstrip("-").isdigit() and k
            }
        return out

    # ---- measuring

    def run_one(self, t: Target, workload: str, mode: str, clients: int, secs: int) -> dict:
        a = self.args
        argv = [
            "-f",
            str(self.script_files[workload]),
            "-D",
            f"nposts={a.posts}",
            "-D",
            f"nusers={a.users}",
            # a deadlock between two writers is retried (pgbench 15+), not a failed client
            "--max-tries",
            "10",
        ]
        pm = self.postmaster_pid()
        try:
            pg0 = cluster_cpu(pm) if pm else None
            px0 = _proc_cpu(t.proc.pid) if t.proc is not None else None
        except OSError:
            pg0 = px0 = None
        res = self.pgbench_exec(t, argv, mode, clients, secs)
        n = res.get("transactions") or 0
        try:
            if pg0 is not None and n:
                res["pg_cpu_ms_per_xact"] = round((cluster_cpu(pm) - pg0) / n * 1e3, 3)
            if px0 is not None and t.proc is not None and n:
                res["pooler_cpu_ms_per_xact"] = round((_proc_cpu(t.proc.pid) - px0) / n * 1e3, 3)
        except OSError:
            pass
        return res

    def postmaster_pid(self) -> int | None:
        if getattr(self, "_pm", None) is None:
            try:
                assert self.cluster is not None and self.cluster.data_dir is not None
                pid_file = self.cluster.data_dir / "postmaster.pid"
                self._pm = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, AssertionError, IndexError):
                self._pm = 0
        return self._pm or None

    def measure(self) -> list[dict[str, Any]]:
        a = self.args
        # mode by mode: the per-cell oracle then tells which query mode left rows stale
        cells = [(w, m, c) for m in a.modes for w in a.workloads for c in a.clients]
        results = []
        for i, (workload, mode, clients) in enumerate(cells, 1):
            names = a.b_targets if workload == "same-row-x10" else a.targets
            cell: dict[str, Any] = {
                "workload": workload,
                "description": WORKLOAD_DESC[workload],
                "mode": mode,
                "clients": clients,
                "jobs": min(a.jobs, clients),
                "targets": list(names),
                "runs": {n: [] for n in names},
                "warmup_transactions": {},
                "status": {},
            }
            print(f"\n[{i}/{len(cells)}] {workload} -M {mode} -c {clients}", flush=True)
            active = []
            for n in names:
                if n == "pgbouncer" and mode == "prepared":
                    cell["status"][n] = UNSUPPORTED
                    print(f"  {n:11s} {UNSUPPORTED} (PgBouncer < 1.21, transaction mode)")
                else:
                    active.append(self.targets[n])
            self.flush_pool_stats()
            writes0, stats0 = self.tv_writes(), self.tview_stats()
            if a.warmup > 0:
                for t in active:
                    if t.alive():
                        w = self.run_one(t, workload, mode, clients, a.warmup)
                        cell["warmup_transactions"][t.name] = w.get("transactions") or 0
            for r in range(a.runs):
                shift = r % len(active) if active else 0
                for t in active[shift:] + active[:shift]:
                    if not t.alive():
                        cell["runs"][t.name].append(
                            {"target": t.name, "tps": None, "error": t.dead, "run": r + 1}
                        )
                        print(f"  run {r + 1} {t.name:11s} skipped: {t.dead}", flush=True)
                        continue
                    res = self.run_one(t, workload, mode, clients, a.duration)
                    res["run"] = r + 1
                    cell["runs"][t.name].append(res)
                    if res.get("error"):
                        print(
                            f"  run {r + 1} {t.name:11s} ERROR {res['error']}\n"
                            f"{_indent(res.get('stderr_tail', ''))}",
                            flush=True,
                        )
                    else:
                        print(
                            f"  run {r + 1} {t.name:11s} {res['tps']:9.1f} tps "
                            f"{res['latency_ms']:8.3f} ms",
                            flush=True,
                        )
            self.flush_pool_stats()
            writes1, stats1 = self.tv_writes(), self.tview_stats()
            cell["refresh_work"] = refresh_work(cell, writes0, writes1, stats0, stats1)
            if a.cell_oracle:
                t0 = time.monotonic()
                dbs = tuple(
                    db
                    for db, who in ((DB_TVIEW, "tvproxy-on"), (DB_TRIG, "triggers"))
                    if who in names
                )
                cell["stale_after"] = self.stale_rows(dbs)
                cell["oracle_s"] = round(time.monotonic() - t0, 2)
            summarize(cell)
            print("  " + summary_line(cell), flush=True)
            results.append(cell)
        return results


# -- where the time of one refresh goes -----------------------------------------------------------

PROFILE_CASES = {
    # name: (keys touched as the proxy would record them, the trigger-side statements)
    "write-txn": (
        {"post": "x", "user": "y"},
        (
            "UPDATE tb_post SET title = title || '!' WHERE pk_post = {x}",
            "UPDATE tb_user SET email = email || '!' WHERE pk_user = {y}",
        ),
    ),
    "autocommit": ({"post": "x"}, ("UPDATE tb_post SET title = title || '!' WHERE pk_post = {x}",)),
    "same-row-x10": (
        {"user": "y"},
        tuple(
            f"UPDATE tb_user SET email = email || '{i}' WHERE pk_user = {{y}}" for i in range(10)
        ),
    ),
}


def _literal_params(sql: str, params: tuple[object, ...]) -> str:
    for i in range(len(params), 0, -1):
        v = params[i - 1]
        lit = "'{" + ",".join(str(x) for x in v) + "}'" if isinstance(v, list) else repr(v)
        sql = sql.replace(f"${i}", lit)
    return sql


async def _profile(host: str, port: int, users: int, posts: int, reps: int) -> dict[str, Any]:
    """EXPLAIN ANALYZE (in rolled-back transactions) of the refresh tvproxy would inject for one
    transaction of each workload, in db tview, and of the same writes in db trig, where the
    per-row triggers run inside the UPDATE. Uses tvproxy's own planner, so the statements are
    the ones the proxy sends; planning time counts because the proxy sends them unnamed (parsed
    and planned at every COMMIT) while plpgsql caches the triggers' plans."""
    import random

    import asyncpg

    from tvproxy.tview.ddl import load_runtime
    from tvproxy.tview.planner import plan_refresh

    rnd = random.Random(42)
    out: dict[str, Any] = {}
    tv = await asyncpg.connect(host=host, port=port, user=USER, database=DB_TVIEW)
    tr = await asyncpg.connect(host=host, port=port, user=USER, database=DB_TRIG)
    try:
        rt = await load_runtime(tv, "tvproxy")
        for case, (touch, trig_sql) in PROFILE_CASES.items():
            per_stmt: dict[str, dict[str, list[float]]] = {}
            trig: dict[str, list[float]] = {"execution_ms": [], "trigger_ms": []}
            for _ in range(reps):
                x, y = rnd.randint(1, posts), rnd.randint(1, users)
                keys = {e: {x if v == "x" else y} for e, v in touch.items()}
                plan = plan_refresh(
                    rt.specs, rt.order, keys, rt.key_types, 0x7476, 100, rt.all_keys, rt.derived,
                    rt.fk_sources,
                )
                if plan is None:
                    continue
                head = ["gate", "keys", "locks"][-plan.first_refresh:] if plan.first_refresh else []
                labels = [*head, *(f"refresh tv_{e}" for e in plan.entities)]
                # the base writes first, as in the client's transaction; all rolled back
                await tv.execute("BEGIN")
                try:
                    for sql in trig_sql:
                        await tv.execute(sql.format(x=x, y=y))
                    for label, sql, params in zip(
                        labels, plan.statements, plan.params, strict=True
                    ):
                        doc = await tv.fetchval(
                            "EXPLAIN (ANALYZE, FORMAT JSON) " + _literal_params(sql, params)
                        )
                        top = json.loads(doc)[0]
                        d = per_stmt.setdefault(label, {"planning_ms": [], "execution_ms": []})
                        d["planning_ms"].append(top["Planning Time"])
                        d["execution_ms"].append(top["Execution Time"])
                finally:
                    await tv.execute("ROLLBACK")
                await tr.execute("BEGIN")
                try:
                    ex = tg = 0.0
                    for sql in trig_sql:
                        doc = await tr.fetchval(
                            "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.format(x=x, y=y)
                        )
                        top = json.loads(doc)[0]
                        ex += top["Planning Time"] + top["Execution Time"]
                        tg += sum(t.get("Time", 0.0) for t in top.get("Triggers", ()))
                    trig["execution_ms"].append(ex)
                    trig["trigger_ms"].append(tg)
                finally:
                    await tr.execute("ROLLBACK")

            def med(xs: list[float]) -> float:
                return round(statistics.median(xs), 3)

            stmts = {k: {m: med(v) for m, v in d.items()} for k, d in per_stmt.items()}
            out[case] = {
                "tvproxy_statements": stmts,
                "tvproxy_planning_ms": round(sum(d["planning_ms"] for d in stmts.values()), 3),
                "tvproxy_execution_ms": round(sum(d["execution_ms"] for d in stmts.values()), 3),
                "triggers_statements_ms": med(trig["execution_ms"]),
                "triggers_in_trigger_ms": med(trig["trigger_ms"]),
            }
    finally:
        await tv.close()
        await tr.close()
    return out


# -- statistics -----------------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(cell: dict[str, Any]) -> None:
    tps: dict[str, float | None] = {}
    lat: dict[str, float | None] = {}
    for n in cell["targets"]:
        if cell["status"].get(n) == UNSUPPORTED:
            tps[n] = lat[n] = None
            continue
        ok = [r for r in cell["runs"][n] if r.get("tps") is not None and not r.get("error")]
        errs = len(cell["runs"][n]) - len(ok)
        m = _median([r["tps"] for r in ok])
        tps[n] = round(m, 1) if m is not None else None
        ml = _median([r["latency_ms"] for r in ok if r.get("latency_ms") is not None])
        lat[n] = round(ml, 3) if ml is not None else None
        cell["status"][n] = "ok" if not errs else f"{errs}/{len(cell['runs'][n])} runs failed"
    cell["median_tps"] = tps
    cell["median_latency_ms"] = lat
    for key in ("pg_cpu_ms_per_xact", "pooler_cpu_ms_per_xact"):
        cell[f"median_{key}"] = {
            n: (
                round(statistics.median(v), 3)
                if (
                    v := [
                        r[key]
                        for r in cell["runs"].get(n, [])
                        if r.get(key) is not None and not r.get("error")
                    ]
                )
                else None
            )
            for n in cell["targets"]
        }

    def ratio(a: str, b: str) -> float | None:
        x, y = tps.get(a), tps.get(b)
        return round(x / y, 3) if x and y else None

    def paired(a: str, b: str) -> float | None:
        by_run = {
            r["run"]: r["tps"]
            for r in cell["runs"].get(b, [])
            if r.get("tps") and not r.get("error")
        }
        xs = [
            r["tps"] / by_run[r["run"]]
            for r in cell["runs"].get(a, [])
            if r.get("tps") and not r.get("error") and r["run"] in by_run
        ]
        return round(statistics.median(xs), 3) if xs else None

    pairs = [
        ("tvproxy-on", "tvproxy-off"),
        ("tvproxy-on", "triggers"),
        ("tvproxy-on", "direct"),
        ("tvproxy-off", "direct"),
        ("tvproxy-off", "pgbouncer"),
        ("pgbouncer", "direct"),
        ("triggers", "direct"),
    ]
    cell["ratios"] = {
        f"{a}/{b}": ratio(a, b) for a, b in pairs if a in cell["targets"] and b in cell["targets"]
    }
    cell["ratios_paired_median"] = {
        f"{a}/{b}": paired(a, b) for a, b in pairs if a in cell["targets"] and b in cell["targets"]
    }


def refresh_work(
    cell: dict[str, Any],
    writes0: dict[str, dict[str, int]],
    writes1: dict[str, dict[str, int]],
    stats0: dict[str, dict[str, int]],
    stats1: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """What keeping the tv_ tables fresh cost per transaction, over the whole cell (warm-up
    included): tv_ row writes per transaction for tvproxy-on and triggers, and tvproxy-on's
    refresh statements per COMMIT."""

    def xacts(name: str) -> int:
        runs = cell["runs"].get(name, [])
        return sum(r.get("transactions") or 0 for r in runs) + cell["warmup_transactions"].get(
            name, 0
        )

    out: dict[str, Any] = {}
    for name, db in (("tvproxy-on", DB_TVIEW), ("triggers", DB_TRIG)):
        n = xacts(name)
        if name not in cell["targets"] or not n:
            continue
        delta = {
            k: writes1.get(db, {}).get(k, 0) - writes0.get(db, {}).get(k, 0)
            for k in writes1.get(db, {})
        }
        out[name] = {
            "transactions": n,
            "tv_row_writes_per_xact": {k: round(v / n, 2) for k, v in sorted(delta.items())},
            "tv_row_writes_per_xact_total": round(sum(delta.values()) / n, 2),
        }
    plain = {
        k: writes1.get(DB_PLAIN, {}).get(k, 0) - writes0.get(DB_PLAIN, {}).get(k, 0)
        for k in writes1.get(DB_PLAIN, {})
    }
    out["plain_tv_row_writes"] = sum(plain.values())  # expected 0: nothing refreshes db plain
    if stats1.get("*") and "tvproxy-on" in out:
        d = {k: stats1["*"].get(k, 0) - stats0.get("*", {}).get(k, 0) for k in stats1["*"]}
        commits = d.get("commits", 0)
        per_tview = {
            tv: stats1[tv].get("refresh_statements", 0)
            - stats0.get(tv, {}).get("refresh_statements", 0)
            for tv in stats1
            if tv != "*"
        }
        out["tvproxy-on"]["show_tview_stats"] = {
            "commits_with_refresh": commits,
            "refresh_statements": d.get("refresh_statements", 0),
            "refresh_statements_per_commit": round(d.get("refresh_statements", 0) / commits, 2)
            if commits
            else None,
            "refresh_statements_per_tview": per_tview,
            "rows_written_per_commit": round(
                sum(
                    stats1[tv].get(k, 0) - stats0.get(tv, {}).get(k, 0)
                    for tv in stats1
                    if tv != "*"
                    for k in ("rows_refreshed", "rows_deleted")
                )
                / commits,
                2,
            )
            if commits
            else None,
            "avg_refresh_us": round(d.get("total_refresh_us", 0) / commits) if commits else None,
            "errors": d.get("errors", 0),
        }
    return out


# -- reporting ------------------------------------------------------------------------------------


def _oracle_line(o: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{db}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for db, d in o.items())


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return format(v, spec) if v is not None else "—"


def _tps_cell(cell: dict[str, Any], n: str) -> str:
    st = cell["status"].get(n)
    if n not in cell["targets"]:
        return ""
    if st == UNSUPPORTED:
        return "n/a"
    s = _fmt(cell["median_tps"].get(n))
    if st and st != "ok":
        s += f" ({st})"
    return s


def summary_line(cell: dict[str, Any]) -> str:
    parts = [f"{n}={_tps_cell(cell, n)}" for n in cell["targets"]]
    r = cell["ratios"]
    extra = [f"{k}={_fmt_ratio(v)}" for k, v in r.items() if k.startswith("tvproxy-on/")]
    return ", ".join(parts) + " | " + " ".join(extra)


def scan_logs(bench: TviewBench) -> dict[str, Any]:
    """Warnings and errors in the proxies' JSON logs and PostgreSQL's log."""
    out: dict[str, Any] = {}
    for name, t in bench.targets.items():
        if t.log is None or not t.log.exists():
            continue
        counts: dict[str, int] = {}
        samples: list[str] = []
        for line in t.log.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
                level = str(ev.get("level", "")).lower()
            except ValueError:
                low = line.lower()
                level = next((lv for lv in ("error", "warning") if lv in low), "")
                ev = line
            if level in ("warning", "error", "critical"):
                counts[level] = counts.get(level, 0) + 1
                if len(samples) < 10:
                    samples.append(ev if isinstance(ev, str) else json.dumps(ev))
        out[name] = {"counts": counts, "samples": samples}
    if bench.cluster is not None and bench.cluster.log_file is not None:
        counts = {}
        samples = []
        try:
            lines = bench.cluster.log_file.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            for level in ("ERROR", "FATAL", "PANIC", "WARNING"):
                if f" {level}: " in line:
                    counts[level] = counts.get(level, 0) + 1
                    if len(samples) < 10:
                        samples.append(line)
        out["postgresql"] = {"counts": counts, "samples": samples}
    return out


def render_md(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    cells = report["cells"]
    lines = [
        f"# TVIEW write overhead — {report['started_at']}",
        "",
        f"Command: `{report['command'].strip()}`",
        "",
        f"Fixture F x {s['companies']:,} companies, {s['users']:,} users, {s['posts']:,} posts, "
        f"{s['comments']:,} comments (tv_user.data includes email; tb_ fk columns indexed), "
        f"copied into three databases. TVIEWs tv_company, tv_user, tv_post. PostgreSQL "
        f"throwaway cluster (fsync off, synchronous_commit off), poolers in transaction mode, "
        f"pool size {s['pool_size']}, all on 127.0.0.1. Each cell: median of {s['runs']} runs "
        f"of {s['duration']} s per target, rounds interleaved (order rotated each round), "
        f"warm-up {s['warmup']} s per target not counted, `-j {s['jobs']}`, pgbench "
        f"`--max-tries 10`. Setup took {report.get('setup_s')} s.",
        "",
        "Targets:",
        "",
        *(f"- `{n}`: {TARGET_DESC[n]}" for n in TARGETS),
        "",
        "## Headline",
        "",
        "Per-write-transaction overhead of capture + injection + refresh: TPS tvproxy-on / "
        "TPS tvproxy-off (the same proxy with `[tview] enabled` true vs false; 1.00 = free). "
        "Against the in-database baseline: tvproxy-on / triggers (same-row-x10: coalescing "
        "at COMMIT vs a refresh per row event).",
        "",
        "| workload | mode | clients | tvproxy-on / tvproxy-off | same-round median | "
        "tvproxy-on / triggers | tvproxy-on / direct | tv_ fresh after the cell |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        r, p = c["ratios"], c["ratios_paired_median"]
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | "
            f"{_fmt_ratio(r.get('tvproxy-on/tvproxy-off'))} | "
            f"{_fmt_ratio(p.get('tvproxy-on/tvproxy-off'))} | "
            f"{_fmt_ratio(r.get('tvproxy-on/triggers'))} | "
            f"{_fmt_ratio(r.get('tvproxy-on/direct'))} | {_fresh_cell(c)} |"
        )
    if any("STALE" in _fresh_cell(c) for c in cells):
        lines += [
            "",
            "**STALE** marks a cell after which the tv_ tables of that database differed from "
            "their views (keys whose tv_ row is missing, extra or different; cumulative over "
            "the run, see the oracle section): the TPS of such a target does not include the "
            "refresh work it skipped.",
        ]
    lines += [
        "",
        "## TPS (median) and latency average (median, ms)",
        "",
        "| workload | mode | clients | " + " | ".join(TARGETS) + " |",
        "|---|---|---:|" + "---:|" * len(TARGETS),
    ]
    for c in cells:
        row = []
        for n in TARGETS:
            if n not in c["targets"]:
                row.append("")
                continue
            lat = c["median_latency_ms"].get(n)
            t = _tps_cell(c, n)
            row.append(t + (f" ({lat:.2f} ms)" if lat is not None else ""))
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | " + " | ".join(row) + " |"
        )
    lines += [
        "",
        "## CPU per transaction (median, ms): PostgreSQL + pooler process",
        "",
        "PostgreSQL = every process of this cluster (backends, autovacuum, ...; not other "
        "clusters on the machine) over the run, divided by the transactions pgbench counted; "
        "pooler = the PgBouncer or tvproxy process. On a shared 2-core box this is steadier "
        "than TPS. pgbench's own CPU is not counted.",
        "",
        "| workload | mode | clients | " + " | ".join(TARGETS) + " |",
        "|---|---|---:|" + "---:|" * len(TARGETS),
    ]
    for c in cells:
        row = []
        for n in TARGETS:
            if n not in c["targets"] or c["status"].get(n) == UNSUPPORTED:
                row.append("")
                continue
            pg = c.get("median_pg_cpu_ms_per_xact", {}).get(n)
            px = c.get("median_pooler_cpu_ms_per_xact", {}).get(n)
            row.append(_fmt(pg, ".2f") + (f" + {px:.2f}" if px is not None else ""))
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | " + " | ".join(row) + " |"
        )
    lines += [
        "",
        "Other ratios of the medians:",
        "",
        "| workload | mode | clients | "
        + " | ".join(k for k in _ratio_keys(cells) if not k.startswith("tvproxy-on/"))
        + " |",
        "|---|---|---:|"
        + "---:|" * len([k for k in _ratio_keys(cells) if not k.startswith("tvproxy-on/")]),
    ]
    for c in cells:
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | "
            + " | ".join(
                _fmt_ratio(c["ratios"].get(k))
                for k in _ratio_keys(cells)
                if not k.startswith("tvproxy-on/")
            )
            + " |"
        )
    lines += [
        "",
        "## Refresh work per transaction",
        "",
        "tv_ row writes per transaction from `pg_stat_user_tables` (inserts + updates + deletes "
        "on tv_company/tv_user/tv_post, over the whole cell including warm-up); tvproxy-on's "
        "refresh statements per COMMIT from `SHOW TVIEW STATS` (one per TVIEW touched). Nothing "
        "writes the tv_ tables of db plain (the 'plain' column must be 0).",
        "",
        "| workload | mode | clients | tvproxy-on tv rows/xact | (proxy's count) | "
        "refresh stmts/commit | commits refreshed / xacts | avg refresh µs | "
        "triggers tv rows/xact | plain tv writes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        w = c.get("refresh_work", {})
        on = w.get("tvproxy-on", {})
        st = on.get("show_tview_stats", {})
        tr = w.get("triggers", {})
        refreshed = (
            f"{st['commits_with_refresh']:,} / {on['transactions']:,}"
            if st.get("commits_with_refresh") is not None and on.get("transactions")
            else "—"
        )
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | "
            f"{_fmt(on.get('tv_row_writes_per_xact_total'), '.2f')} | "
            f"{_fmt(st.get('rows_written_per_commit'), '.2f')} | "
            f"{_fmt(st.get('refresh_statements_per_commit'), '.2f')} | {refreshed} | "
            f"{_fmt(st.get('avg_refresh_us'), ',.0f')} | "
            f"{_fmt(tr.get('tv_row_writes_per_xact_total'), '.2f')} | "
            f"{w.get('plain_tv_row_writes', '—')} |"
        )
    lines += [
        "",
        "Expected per transaction when every refresh happens: write-txn 1 tv_post row + 1 "
        "tv_user row + that user's tv_post rows (5 at the default sizes) = 7; autocommit 1; "
        "same-row-x10: tvproxy 6 (one refresh at COMMIT), triggers 60 (every UPDATE refreshes "
        "the user and its posts again). tvproxy skips rows whose content did not change, the "
        "triggers rewrite them (full replacement, as pg_tviews).",
    ]
    prof = report.get("refresh_profile") or {}
    if prof:
        lines += ["", "## Where one refresh's time goes (EXPLAIN ANALYZE, medians)", ""]
        if "error" in prof:
            lines.append(f"Profile failed: {prof['error']}")
        else:
            lines += [
                "One transaction of each workload on random keys (7 samples), in rolled-back "
                "transactions, with no benchmark traffic running (the machine's other load "
                "still applies): tvproxy's injected statements (built by tvproxy's own "
                "planner, as the proxy sends them: unnamed, so parsed and planned at every "
                "COMMIT) in db tview; the same UPDATEs in db trig, where the row triggers run "
                "inside them (plpgsql caches their plans).",
                "",
                "| workload | tvproxy statements: planning ms / execution ms | tvproxy total "
                "planning ms | tvproxy total execution ms | triggers: UPDATE(s) total ms | "
                "of which in triggers ms |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for case, d in prof.items():
                parts = "; ".join(
                    f"{k} {v['planning_ms']:.2f} / {v['execution_ms']:.2f}"
                    for k, v in d["tvproxy_statements"].items()
                )
                lines.append(
                    f"| {case} | {parts} | {d['tvproxy_planning_ms']:.2f} | "
                    f"{d['tvproxy_execution_ms']:.2f} | {d['triggers_statements_ms']:.2f} | "
                    f"{d['triggers_in_trigger_ms']:.2f} |"
                )
    ob, oa = report.get("oracle_before", {}), report.get("oracle_after", {})
    lines += [
        "",
        "## Correctness (oracle)",
        "",
        "Rows of `(tv_x EXCEPT v_x) UNION ALL (v_x EXCEPT tv_x)` per database, before the first "
        "and after the last run. `tview` (tvproxy-on) and `trig` (triggers) must be 0; `plain` "
        "is written without any refresh, so its tv_ tables are expected to be stale.",
        "",
        "| database | "
        + " | ".join(f"tv_{e} before" for e in TVIEWS)
        + " | "
        + " | ".join(f"tv_{e} after" for e in TVIEWS)
        + " | verdict |",
        "|---|" + "---:|" * (2 * len(TVIEWS)) + "---|",
    ]
    for db in (DB_TVIEW, DB_TRIG, DB_PLAIN):
        b, a_ = ob.get(db, {}), oa.get(db, {})
        if db == DB_PLAIN:
            verdict = "stale, as expected (no refresh)" if any(a_.values()) else "fresh"
        else:
            verdict = "**FRESH**" if a_ and not any(a_.values()) else "**STALE**"
        lines.append(
            f"| {db} | "
            + " | ".join(str(b.get(f"tv_{e}", "—")) for e in TVIEWS)
            + " | "
            + " | ".join(str(a_.get(f"tv_{e}", "—")) for e in TVIEWS)
            + f" | {verdict} |"
        )
    lines += [
        "",
        "## Raw TPS per run",
        "",
        "| workload | mode | clients | target | runs (TPS) | median | failed xacts | retried |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for c in cells:
        for n in c["targets"]:
            runs = c["runs"].get(n, [])
            if c["status"].get(n) == UNSUPPORTED:
                vals = UNSUPPORTED
            else:
                vals = ", ".join(
                    "ERR" if r.get("error") or r.get("tps") is None else f"{r['tps']:,.0f}"
                    for r in runs
                )
            failed = sum(r.get("failed_transactions") or 0 for r in runs)
            retried = sum(r.get("retried") or 0 for r in runs)
            lines.append(
                f"| {c['workload']} | {c['mode']} | {c['clients']} | {n} | {vals} | "
                f"{_tps_cell(c, n)} | {failed} | {retried} |"
            )
    errors = [(c, r) for c in cells for rs in c["runs"].values() for r in rs if r.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        for c, r in errors:
            lines += [
                f"### {r['target']}: {c['workload']} -M {c['mode']} -c {c['clients']} "
                f"run {r.get('run', '?')}",
                "",
                str(r["error"]),
                "",
                "```",
                (r.get("stderr_tail") or "").rstrip() or "(no stderr)",
                "```",
            ]
            if r.get("server_log_tail"):
                lines += ["", "```", r["server_log_tail"].rstrip(), "```"]
            lines.append("")
    logs = report.get("logs", {})
    lines += ["", "## Logs", ""]
    for name, info in logs.items():
        counts = ", ".join(f"{k}: {v}" for k, v in info["counts"].items()) or "none"
        lines.append(f"- {name}: warnings/errors {counts}")
        for smp in info["samples"][:5]:
            lines.append(f"  - `{smp[:300]}`")
    if report.get("crashed"):
        lines += ["", "## Crashed processes", ""]
        for name, tail in report["crashed"].items():
            lines += [f"### {name}", "", "```", tail, "```", ""]
    lines += ["", "## Machine", ""]
    for k, v in m.items():
        lines.append(f"- {k}: {v}")
    loads = [
        r["loadavg_1m_after"]
        for c in cells
        for rs in c["runs"].values()
        for r in rs
        if r.get("loadavg_1m_after") is not None
    ]
    if loads:
        lines.append(
            f"- 1-minute load average after each run: {min(loads):.2f} to {max(loads):.2f} "
            f"(median {statistics.median(loads):.2f}) on {m.get('nproc')} CPUs"
        )
    lines += [
        "",
        "## Scripts",
        "",
        *(
            line
            for name, text in report["scripts"].items()
            for line in (
                f"`{name}` (`-D nposts=... -D nusers=...`):",
                "",
                "```",
                text.rstrip(),
                "```",
                "",
            )
        ),
    ]
    return "\n".join(lines) + "\n"


def _fresh_cell(c: dict[str, Any]) -> str:
    o = c.get("stale_after")
    if not o:
        return "—"
    out = []
    for db, who in ((DB_TVIEW, "tvproxy-on"), (DB_TRIG, "triggers")):
        if who not in c["targets"]:
            continue
        n = sum(o.get(db, {}).values())
        if db in o:
            out.append(f"{who}: " + ("yes" if n == 0 else f"**STALE** ({n} keys)"))
    return ", ".join(out) or "—"


def _ratio_keys(cells: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for c in cells:
        for k in c["ratios"]:
            if k not in keys:
                keys.append(k)
    return keys


# -- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="TVIEW write overhead: tvproxy with/without TVIEWs, refresh triggers, "
        "direct PostgreSQL and PgBouncer, interleaved, in one run.",
    )
    p.add_argument(
        "--workloads",
        type=_choice_list(WORKLOADS),
        default=list(WORKLOADS),
        help="comma-separated subset of " + ",".join(WORKLOADS) + " (default all)",
    )
    p.add_argument(
        "--modes",
        type=_choice_list(MODES),
        default=["simple", "extended"],
        help="pgbench query modes (default simple,extended; prepared too if you like)",
    )
    p.add_argument("--clients", type=_int_list, default=[8], help="client counts (default 8)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="pgbench threads (default 2)")
    p.add_argument(
        "--targets",
        type=_choice_list(TARGETS),
        default=["direct", "pgbouncer", "tvproxy-off", "tvproxy-on"],
        help="targets of workloads write-txn and autocommit "
        "(default direct,pgbouncer,tvproxy-off,tvproxy-on; triggers is also possible)",
    )
    p.add_argument(
        "--b-targets",
        type=_choice_list(TARGETS),
        default=["tvproxy-on", "triggers"],
        help="targets of same-row-x10 (default tvproxy-on,triggers)",
    )
    p.add_argument("--duration", type=int, default=4, help="seconds per run (default 4)")
    p.add_argument("--runs", type=int, default=3, help="rounds per cell (default 3)")
    p.add_argument(
        "--warmup", type=int, default=1, help="uncounted warm-up seconds per target (default 1)"
    )
    p.add_argument("--companies", type=int, default=1000)
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--posts", type=int, default=50000)
    p.add_argument("--comments", type=int, default=100000)
    p.add_argument(
        "--no-cell-oracle",
        dest="cell_oracle",
        action="store_false",
        help="skip the stale-row check after every cell (the oracle still runs before and "
        "after all cells)",
    )
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the EXPLAIN ANALYZE profile of tvproxy's refresh statements",
    )
    p.add_argument("--pool-size", type=int, default=16, help="pool size of every pooler")
    p.add_argument("--max-client-conn", type=int, default=500)
    p.add_argument("--pgbouncer", default="/usr/sbin/pgbouncer", help="PgBouncer binary")
    p.add_argument(
        "--tvproxy-log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="both tvproxy instances (default warning: at info tvproxy-on logs one line per "
        "refresh, which this benchmark does not mean to measure)",
    )
    p.add_argument("--grace", type=int, default=60, help="seconds before a stuck pgbench stops")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rewrite the Markdown of an existing -tview.json, then exit",
    )
    return p


def write_reports(report: dict[str, Any], out: Path, stamp: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}-tview.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render_md(report)
    md = out / f"{stamp}-tview.md"
    md.write_text(text)
    (out / "latest-tview.md").write_text(text)
    return md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        md = write_reports(report, args.render.parent, report["started_at"])
        print(md.read_text())
        return 0
    if min(args.users, args.posts, args.companies, args.comments) <= 0:
        raise SystemExit("sizes must be positive")
    command = " ".join(["python bench/tview.py", *(sys.argv[1:] if argv is None else argv)])
    install_signal_handlers()
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    bench = TviewBench(args)
    try:
        bench.start()
        machine = bench.machine()
        cells = bench.measure()
        print("\noracle after the run ...", flush=True)
        oracle_after = bench.oracle()
        print(f"  {_oracle_line(oracle_after)}")
        crashed = {
            n: _tail(t.log, 60)
            for n, t in bench.targets.items()
            if t.proc is not None and not t.alive()
        }
        profile: dict[str, Any] = {}
        if args.profile:
            print("profiling one refresh per workload (EXPLAIN ANALYZE) ...", flush=True)
            try:
                assert bench.cluster is not None
                profile = asyncio.run(
                    _profile(bench.cluster.host, bench.cluster.port, args.users, args.posts, 7)
                )
            except Exception as e:  # noqa: BLE001 - a diagnostic; never fails the benchmark
                profile = {"error": f"{type(e).__name__}: {e}"}
        logs = scan_logs(bench)
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
            "workloads": args.workloads,
            "modes": args.modes,
            "clients": args.clients,
            "jobs": args.jobs,
            "targets": args.targets,
            "b_targets": args.b_targets,
            "duration": args.duration,
            "runs": args.runs,
            "warmup": args.warmup,
            "companies": args.companies,
            "users": args.users,
            "posts": args.posts,
            "comments": args.comments,
            "pool_size": args.pool_size,
            "pool_mode": "transaction",
            "tvproxy_log_level": args.tvproxy_log_level,
            "databases": TARGET_DB,
            "order": "per cell: warm-up per target, then rounds; every round runs each target "
            "once, the order rotated by one each round",
        },
        "setup_s": bench.setup_s,
        "tview_ddl": bench.ddl_results,
        "machine": machine,
        "cells": cells,
        "oracle_before": bench.oracle_before,
        "oracle_after": oracle_after,
        "refresh_profile": profile,
        "logs": logs,
        "scripts": scripts(),
        "trigger_sql": trigger_sql(),
        "tview_selects": {f"tv_{e}": tview_ddl(e) for e in TVIEWS},
    }
    if crashed:
        report["crashed"] = crashed
    md = write_reports(report, args.out_dir, stamp)
    print("\n" + md.read_text())
    print(f"wrote {args.out_dir}/{stamp}-tview.{{json,md}} and {args.out_dir / 'latest-tview.md'}")
    bad = any(r.get("error") for c in cells for rs in c["runs"].values() for r in rs)
    stale = any(any(oracle_after.get(db, {}).values()) for db in (DB_TVIEW, DB_TRIG))
    if stale:
        print("STALE: a tv_ table differs from its view in db tview or trig", file=sys.stderr)
    return 2 if bad or stale else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
