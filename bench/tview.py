#!/usr/bin/env python3
"""TVIEW write overhead, side by side in one run: tvproxy with TVIEWs vs without, vs per-row
and per-statement refresh triggers in PostgreSQL, with direct PostgreSQL and PgBouncer for
reference.

    python bench/tview.py                                  # defaults: about 15 minutes
    python bench/tview.py --duration 10 --runs 5 --clients 8,16 --modes simple,extended
    python bench/tview.py --workloads same-row-x10 --b-targets tvproxy-on,triggers,tvproxy-off
    python bench/tview.py --workloads bulk-1000 --scale-check      # + the 10x fixture (slow)

Data: fixture F of shared/scenarios/tviews.md scaled up (default 1000 companies, 10000 users,
50000 posts, 100000 comments), with indexes on the tb_ foreign keys and the user's email in
tv_user.data (so that ``UPDATE tb_user SET email`` changes the read model). Loaded once into a
template database and copied into four databases, so all of them start identical:

- ``tview``: TVIEWs tv_company, tv_user, tv_post declared through tvproxy (``CREATE TABLE tv_x AS
  SELECT ...``); written only through ``tvproxy-on`` (``[tview] enabled = true``).
- ``plain``: the same TVIEWs declared the same way, but written only by ``direct``, ``pgbouncer``
  and ``tvproxy-off`` (``[tview] enabled = false``): nothing refreshes them (no refresh at all).
- ``trig``: the same v_/tv_ objects created with plain SQL, kept fresh by per-row plpgsql
  AFTER INSERT/UPDATE/DELETE triggers on the four tb_ tables (the way pg_tviews runs them:
  upsert from v_x at once, for each modified row, and cascade to the dependents); written by
  ``triggers`` (direct connections).
- ``stmt``: the same v_/tv_ objects, kept fresh by statement-level AFTER triggers with
  transition tables (one trigger per event): one set-based upsert from v_x per statement for
  the keys in the transition tables, with the same cascades; written by ``stmt-triggers``.

Besides: ``notview``, a ``pgbench -i -s 1`` database without any TVIEW, served by two more
tvproxy instances (``tvproxy-notview-on`` with ``[tview] enabled = true``,
``tvproxy-notview-off`` with false); and with ``--scale-check`` a 10x copy of the fixture
(``tview10``, TVIEWs declared through tvproxy-on, target ``tvproxy-on-10x``).

Workloads (pgbench custom scripts, ``-D`` sets the key ranges):

- ``write-txn`` (A): ``BEGIN; UPDATE tb_post ... WHERE pk_post = :x; UPDATE tb_user SET email
  ... WHERE pk_user = :y; END`` on random keys.
- ``autocommit`` (A): ``UPDATE tb_post ... WHERE pk_post = :x`` outside a transaction block (the
  proxy wraps it in BEGIN ... refresh + COMMIT).
- ``same-row-x10`` / ``same-row-x100`` (B): ``BEGIN; 10 (100) x UPDATE tb_user SET email ...
  WHERE pk_user = :x; END``.
- ``bulk-1000``: ``UPDATE tb_post SET title = title || '!' WHERE pk_post BETWEEN :s AND :s +
  999`` in autocommit.
- ``hot-insert``: ``INSERT INTO tb_post`` of a new post, always under user 1, in autocommit.
- ``select-only-notview``: ``pgbench -S`` against ``notview``.
- ``bulk-1000-10x`` (``--scale-check`` only): ``bulk-1000`` through tvproxy-on on the 1x and
  the 10x fixture, interleaved; reported as the ratio of the latencies.

Every (workload, query mode, client count) cell runs an uncounted warm-up per target, then
``--runs`` rounds in which every target runs once for ``--duration`` seconds (the order rotates
from round to round). Reported: median TPS and latency per target, ratios of the medians
(headline per workload, and a table against the targets of DESIGN.md's benchmarks), the median
of same-round ratios, the refresh work per transaction (tvproxy's SHOW TVIEW STATS, tv_ row
writes from pg_stat_user_tables), and the oracle after the run (tv_x EXCEPT v_x and back, per
database).

Results: ``bench/results/<UTC timestamp>-tview.json`` and ``.md``, copied to
``bench/results/latest-tview.md`` (bench/run.py's ``latest.md`` stays the pgbench one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import inspect
import io
import json
import os
import re
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

# targets a --targets / --b-targets / --bulk-targets / --insert-targets list may name
TVIEW_TARGETS = ("direct", "pgbouncer", "tvproxy-off", "tvproxy-on", "triggers", "stmt-triggers")
NOTVIEW_TARGETS = ("tvproxy-notview-off", "tvproxy-notview-on")
SCALE_TARGETS = ("tvproxy-on", "tvproxy-on-10x")
TARGETS = (*TVIEW_TARGETS, *NOTVIEW_TARGETS, "tvproxy-on-10x")
WORKLOADS = (
    "write-txn",
    "autocommit",
    "same-row-x10",
    "same-row-x100",
    "bulk-1000",
    "hot-insert",
    "select-only-notview",
)
SCALE_WORKLOAD = "bulk-1000-10x"  # added by --scale-check
NOTVIEW_WORKLOAD = "select-only-notview"  # pgbench's builtin -S, not a script of ours
TVIEWS = ("company", "user", "post")
DB_TVIEW, DB_PLAIN, DB_TRIG, DB_STMT, DB_TEMPLATE = "tview", "plain", "trig", "stmt", "fixture"
DB_NOTVIEW, DB_TVIEW10, DB_TEMPLATE10 = "notview", "tview10", "fixture10"
TARGET_DB = {
    "direct": DB_PLAIN,
    "pgbouncer": DB_PLAIN,
    "tvproxy-off": DB_PLAIN,
    "tvproxy-on": DB_TVIEW,
    "triggers": DB_TRIG,
    "stmt-triggers": DB_STMT,
    "tvproxy-notview-off": DB_NOTVIEW,
    "tvproxy-notview-on": DB_NOTVIEW,
    "tvproxy-on-10x": DB_TVIEW10,
}
# the targets whose database is kept fresh (the oracle must hold there after every cell)
FRESH_DB = {
    "tvproxy-on": DB_TVIEW,
    "triggers": DB_TRIG,
    "stmt-triggers": DB_STMT,
    "tvproxy-on-10x": DB_TVIEW10,
}
# tvproxy-on instances and the database whose SHOW TVIEW STATS rows are theirs
PROXY_STATS_DB = {"tvproxy-on": DB_TVIEW, "tvproxy-on-10x": DB_TVIEW10}
TARGET_DESC = {
    "direct": "PostgreSQL directly (db plain, nothing refreshes the tv_ tables)",
    "pgbouncer": "PgBouncer, transaction pooling (db plain, no refresh)",
    "tvproxy-off": "tvproxy with [tview] enabled = false (db plain, no capture, no refresh)",
    "tvproxy-on": "tvproxy with TVIEWs, [tview] enabled = true (db tview, refresh at COMMIT)",
    "triggers": "PostgreSQL directly, per-row plpgsql refresh triggers (db trig)",
    "stmt-triggers": "PostgreSQL directly, statement-level refresh triggers with transition "
    "tables (db stmt)",
    "tvproxy-notview-off": "tvproxy with [tview] enabled = false (db notview: pgbench -i, no "
    "TVIEWs)",
    "tvproxy-notview-on": "tvproxy with [tview] enabled = true (db notview: pgbench -i, no TVIEWs)",
    "tvproxy-on-10x": "the tvproxy-on instance, db tview10 (fixture F x 10, TVIEWs declared "
    "through the proxy; --scale-check only)",
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


def _baseline_objects() -> list[str]:
    """The v_/tv_ objects of an in-database baseline, as tvproxy creates them (view, table from
    the view's columns, primary key, fk_ indexes, GIN on data), filled from the views."""
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
    return parts


def trigger_sql() -> str:
    """The per-row in-database baseline: the v_/tv_ objects kept fresh by per-row AFTER
    triggers on the tb_ tables that refresh at once, the way pg_tviews' wired engine does:
    for every modified row, upsert the tv row(s) from v_x (full replacement, no IS DISTINCT
    FROM), delete a tv row whose source vanished, and cascade to the dependents (tv_user of a
    company, tv_post of a user or of a comment's post, old and new parent when a key moves)."""
    parts = _baseline_objects()

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


# (table, key column of the transition rows, entity whose rows that key is, cascades: entity ->
# the WHERE of its upsert for the key array ``ks``)
_STMT_SOURCES: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "tb_company",
        "pk_company",
        "company",
        (
            ("user", "fk_company = ANY (ks)"),
            ("post", "fk_user IN (SELECT pk_user FROM tb_user WHERE fk_company = ANY (ks))"),
        ),
    ),
    ("tb_user", "pk_user", "user", (("post", "fk_user = ANY (ks)"),)),
    ("tb_post", "pk_post", "post", ()),
    ("tb_comment", "fk_post", "post", ()),  # a comment refreshes its post(s)
)


def stmt_trigger_sql() -> str:
    """The statement-level in-database baseline: the v_/tv_ objects kept fresh by AFTER ...
    FOR EACH STATEMENT triggers with transition tables (PostgreSQL allows transition tables
    only on single-event triggers, so one trigger and function per table and event). Per
    statement: the keys of the old and new transition rows in one array, one set-based upsert
    from v_x for them (full replacement, like the per-row baseline), a delete of the tv rows
    whose key left the table (DELETE, or an UPDATE that changed the key) and no longer is in
    v_x, and the same cascades as the per-row triggers (a company's users and their posts, a
    user's posts, a comment's post) as one upsert each."""
    parts = _baseline_objects()
    for table, col, entity, cascades in _STMT_SOURCES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            ref = {
                "INSERT": "NEW TABLE AS nt",
                "UPDATE": "OLD TABLE AS ot NEW TABLE AS nt",
                "DELETE": "OLD TABLE AS ot",
            }[event]
            keys = {
                "INSERT": f"SELECT {col} FROM nt",
                "UPDATE": f"SELECT {col} FROM ot UNION SELECT {col} FROM nt",
                "DELETE": f"SELECT {col} FROM ot",
            }[event]
            gone = {
                "INSERT": None,
                "UPDATE": f"SELECT {col} FROM ot EXCEPT SELECT {col} FROM nt",
                "DELETE": f"SELECT {col} FROM ot",
            }[event]
            body = [
                f"  SELECT array_agg(DISTINCT k) INTO ks FROM ({keys}) s(k) WHERE k IS NOT NULL;",
                "  IF ks IS NULL THEN RETURN NULL; END IF;",
                f"  {_upsert(entity, f'pk_{entity} = ANY (ks)')}",
            ]
            if gone is not None and col == f"pk_{entity}":
                body.append(
                    f"  DELETE FROM tv_{entity} t WHERE t.pk_{entity} = ANY (ARRAY({gone}))\n"
                    f"    AND NOT EXISTS (SELECT 1 FROM v_{entity} v "
                    f"WHERE v.pk_{entity} = t.pk_{entity});"
                )
            body += [f"  {_upsert(dep, where)}" for dep, where in cascades]
            fn = f"tvs_{table}_{event.lower()}"
            nl = "\n"
            parts.append(f"""
CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE ks bigint[];
BEGIN
{nl.join(body)}
  RETURN NULL;
END $$;
CREATE TRIGGER {fn} AFTER {event} ON {table} REFERENCING {ref}
  FOR EACH STATEMENT EXECUTE FUNCTION {fn}();""")
    return "\n".join(parts)


# -- workloads ------------------------------------------------------------------------------------


def _same_row(n: int) -> str:
    ups = "\n".join(
        f"UPDATE tb_user SET email = 'u' || :r || '-{i}@example.com' WHERE pk_user = :x;"
        for i in range(1, n + 1)
    )
    return f"""\\set x random(2, :nusers)
\\set r random(1, 1000000000)
BEGIN;
{ups}
END;
"""


# hot-insert's keys: -D base=<unique per pgbench run>, and a per-client counter (pgbench keeps a
# client's variables from one transaction to the next); client ids stay below 100.
HOT_INSERT_STRIDE = 10**8
HOT_INSERT_BASE = 10**12


def scripts() -> dict[str, str]:
    """pgbench scripts; :nposts / :nusers / :nbulk / :base come from -D. Every UPDATE writes a
    new value, so every refresh changes the read model (no skipped no-op rows on either side).
    User 1 is hot-insert's: it gathers thousands of posts over a run, so the other workloads
    leave it alone (an UPDATE of it would refresh all of them and stall the cell).
    select-only-notview is pgbench's builtin -S, not a script."""
    return {
        "write-txn": """\\set x random(1, :nposts)
\\set y random(2, :nusers)
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
        "same-row-x10": _same_row(10),
        "same-row-x100": _same_row(100),
        "bulk-1000": """\\set s random(1, :nbulk)
\\set e :s + 999
UPDATE tb_post SET title = title || '!' WHERE pk_post BETWEEN :s AND :e;
""",
        "hot-insert": f"""\\set n :n + 1
\\set pk :base + :client_id * {HOT_INSERT_STRIDE} + :n
\\set r random(1, 1000000000)
INSERT INTO tb_post (pk_post, fk_user, title) VALUES (:pk, 1, 'hot ' || :r);
""",
    }


SCRIPT_OF = {SCALE_WORKLOAD: "bulk-1000"}  # workloads that run another workload's script

WORKLOAD_DESC = {
    "write-txn": "A: BEGIN; UPDATE tb_post (random pk); UPDATE tb_user SET email (random pk); END",
    "autocommit": "A: UPDATE tb_post (random pk) in autocommit",
    "same-row-x10": "B: BEGIN; 10 x UPDATE tb_user SET email on one random pk; END",
    "same-row-x100": "B: BEGIN; 100 x UPDATE tb_user SET email on one random pk; END",
    "bulk-1000": "UPDATE tb_post SET title = title || '!' on 1,000 consecutive pks, autocommit",
    "hot-insert": "INSERT INTO tb_post a new post under user 1, autocommit",
    NOTVIEW_WORKLOAD: "pgbench -S (builtin select-only) on db notview, which has no TVIEWs",
    SCALE_WORKLOAD: "bulk-1000 through tvproxy-on on fixture F x 1 (db tview) and x 10 "
    "(db tview10)",
}

# workload -> the argparse dest of its target list (the others have fixed targets)
WORKLOAD_TARGET_ARG = {
    "write-txn": "targets",
    "autocommit": "targets",
    "same-row-x10": "b_targets",
    "same-row-x100": "b_targets",
    "bulk-1000": "bulk_targets",
    "hot-insert": "insert_targets",
}
FIXED_TARGETS = {NOTVIEW_WORKLOAD: NOTVIEW_TARGETS, SCALE_WORKLOAD: SCALE_TARGETS}

# workload -> row events the triggers refresh for each refresh of the coalesced COMMIT
COALESCED = {"same-row-x10": 10, "same-row-x100": 100}

# workload -> (numerator, denominator, what the headline ratio is)
HEADLINE = {
    "write-txn": ("tvproxy-on", "tvproxy-off", "on / off"),
    "autocommit": ("tvproxy-on", "tvproxy-off", "on / off"),
    "same-row-x10": ("tvproxy-on", "triggers", "TVIEWs / per-row triggers"),
    "same-row-x100": ("tvproxy-on", "triggers", "TVIEWs / per-row triggers"),
    "bulk-1000": ("tvproxy-on", "triggers", "TVIEWs / per-row triggers"),
    "hot-insert": ("tvproxy-on", "tvproxy-off", "on / off"),
    NOTVIEW_WORKLOAD: ("tvproxy-notview-on", "tvproxy-notview-off", "enabled true / false"),
    SCALE_WORKLOAD: ("tvproxy-on-10x", "tvproxy-on", "latency 10x / 1x"),
}
TIME_RATIO = "latency tvproxy-on-10x/tvproxy-on"  # the scale check's ratio (lower is better)

# The targets of DESIGN.md's benchmarks: (what, workload, measure, [(ratio key, op, bound)],
# target as written, query modes the target names)
TARGET_ROWS: tuple[tuple[str, str, str, tuple[tuple[str, str, float], ...], str, tuple], ...] = (
    (
        "10 updates of one user per txn",
        "same-row-x10",
        "TVIEWs ÷ per-row triggers",
        (("tvproxy-on/triggers", ">=", 3.0),),
        ">= 3x (simple, extended, prepared)",
        ("simple", "extended", "prepared"),
    ),
    (
        "100 updates of one user per txn",
        "same-row-x100",
        "TVIEWs ÷ per-row triggers",
        (("tvproxy-on/triggers", ">=", 6.0),),
        ">= 6x",
        (),
    ),
    (
        "UPDATE a user + UPDATE a post per txn (write-txn)",
        "write-txn",
        "on ÷ off",
        (("tvproxy-on/tvproxy-off", ">=", 0.5),),
        ">= 0.5x",
        (),
    ),
    (
        "autocommit single UPDATE",
        "autocommit",
        "on ÷ off",
        (("tvproxy-on/tvproxy-off", ">=", 0.5),),
        ">= 0.5x",
        (),
    ),
    (
        "one UPDATE of 1,000 posts",
        "bulk-1000",
        "TVIEWs ÷ per-row triggers; TVIEWs ÷ statement triggers",
        (("tvproxy-on/triggers", ">=", 5.0), ("tvproxy-on/stmt-triggers", ">=", 1.0)),
        "÷ per-row triggers >= 5x, ÷ statement triggers >= 1x",
        (),
    ),
    (
        "INSERT a post under one hot user",
        "hot-insert",
        "on ÷ off",
        (("tvproxy-on/tvproxy-off", ">=", 0.5),),
        ">= 0.5x",
        (),
    ),
    (
        "pgbench -S on a database with no TVIEWs",
        NOTVIEW_WORKLOAD,
        "enabled true ÷ false",
        (("tvproxy-notview-on/tvproxy-notview-off", ">=", 0.98),),
        ">= 0.98x",
        (),
    ),
    (
        "one UPDATE of 1,000 posts at 10x fixture",
        SCALE_WORKLOAD,
        "time ÷ 1x",
        ((TIME_RATIO, "<=", 1.2),),
        "<= 1.2x",
        (),
    ),
)


# -- CPU accounting (Linux /proc) -----------------------------------------------------------------

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int, children: bool = False) -> float:
    """utime + stime of one process in seconds (+ its waited-for children's)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / _HZ


def _children(postmaster: int) -> set[int]:
    """The live (not yet reaped) child processes of ``postmaster``."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                out.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def wait_reaped(postmaster: int, before: set[int], timeout: float = 10.0) -> None:
    """Wait until the backends a run started have exited and been reaped: a backend that is
    exiting (or a zombie) shows no CPU in /proc, and the postmaster's cutime gets it only once
    it has waited for it, so reading earlier loses the run's direct connections."""
    deadline = time.monotonic() + timeout
    while _children(postmaster) - before and time.monotonic() < deadline:
        time.sleep(0.02)


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds used so far by this cluster: the postmaster, its live children (backends,
    autovacuum, ...) and the children that already exited (counted in its cutime/cstime).
    Other PostgreSQL clusters on the machine are not counted."""
    total = _proc_cpu(postmaster, children=True)
    for pid in _children(postmaster):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += _proc_cpu(pid)
    return total


# -- the bench ------------------------------------------------------------------------------------


class TviewBench(Bench):
    """bench/run.py's Bench (cluster, poolers, pgbench runs, cleanup) with the TVIEW setup."""

    def cell_targets(self, workload: str) -> list[str]:
        """The targets of one workload's cells."""
        if workload in FIXED_TARGETS:
            return list(FIXED_TARGETS[workload])
        return list(getattr(self.args, WORKLOAD_TARGET_ARG[workload]))

    def workloads(self) -> list[str]:
        a = self.args
        return [*a.workloads, *([SCALE_WORKLOAD] if a.scale_check else [])]

    def sizes(self, target: str) -> dict[str, int]:
        """The fixture sizes of the database a target writes."""
        a = self.args
        k = a.scale_factor if TARGET_DB.get(target) == DB_TVIEW10 else 1
        return {n: getattr(a, n) * k for n in ("companies", "users", "posts", "comments")}

    def load_fixture(self, db: str, sizes: dict[str, int]) -> None:
        assert self.cluster is not None
        port = self.cluster.port
        print(
            f"fixture F in db {db}: {sizes['companies']} companies, {sizes['users']} users, "
            f"{sizes['posts']} posts, {sizes['comments']} comments ...",
            flush=True,
        )
        self.psql(port, "postgres", f"CREATE DATABASE {db}")
        self.psql(port, db, FIXTURE_DDL)
        self.psql(port, db, FIXTURE_DATA.format(**sizes), timeout=3600)

    def start(self) -> None:
        a = self.args
        c = self.start_cluster()
        assert self.workdir is not None
        t0 = time.monotonic()
        need = {n for w in self.workloads() for n in self.cell_targets(w)}
        self.fresh_dbs: tuple[str, ...] = (DB_TVIEW, DB_TRIG, DB_STMT) + (
            (DB_TVIEW10,) if a.scale_check else ()
        )
        self.load_fixture(DB_TEMPLATE, self.sizes("tvproxy-on"))
        for db in (DB_TVIEW, DB_PLAIN, DB_TRIG, DB_STMT):
            self.psql(c.port, "postgres", f"CREATE DATABASE {db} TEMPLATE {DB_TEMPLATE}")
        print("per-row trigger baseline in db trig ...", flush=True)
        self.psql(c.port, DB_TRIG, trigger_sql(), timeout=1800)
        print("statement trigger baseline in db stmt ...", flush=True)
        self.psql(c.port, DB_STMT, stmt_trigger_sql(), timeout=1800)
        if a.scale_check:
            t1 = time.monotonic()
            self.load_fixture(DB_TEMPLATE10, self.sizes("tvproxy-on-10x"))
            self.psql(c.port, "postgres", f"CREATE DATABASE {DB_TVIEW10} TEMPLATE {DB_TEMPLATE10}")
            print(f"  loaded in {time.monotonic() - t1:.1f}s", flush=True)
        if need & set(NOTVIEW_TARGETS):
            print(f"pgbench -i -s 1 in db {DB_NOTVIEW} (no TVIEWs) ...", flush=True)
            self.psql(c.port, "postgres", f"CREATE DATABASE {DB_NOTVIEW}")
            self.run_checked(
                [
                    self.pgbench,
                    "-i",
                    "-s",
                    "1",
                    "-q",
                    "-h",
                    c.host,
                    "-p",
                    str(c.port),
                    "-U",
                    USER,
                    DB_NOTVIEW,
                ],
                timeout=600,
            )

        on_dbs = (DB_TVIEW, DB_PLAIN, *((DB_TVIEW10,) if a.scale_check else ()))
        on = self.start_tvproxy("tvproxy-on", on_dbs, {"enabled": True, "schema": "tvproxy"})
        print("TVIEWs through tvproxy-on (CREATE TABLE tv_x AS SELECT ...) ...", flush=True)
        self.ddl_results: dict[str, list[str]] = {}
        for db in on_dbs:
            for e in TVIEWS:
                out = self.psql(on.port, db, tview_ddl(e), timeout=3600)
                self.ddl_results.setdefault(db, []).append(f"tv_{e}: {out or 'ok'}")
        if a.scale_check:
            # the same proxy process, its second TVIEW database (log=None: tvproxy-on's log)
            self.targets["tvproxy-on-10x"] = Target(
                "tvproxy-on-10x", on.host, on.port, on.proc, None, dbname=DB_TVIEW10
            )
        if "tvproxy-off" in need:
            self.start_tvproxy("tvproxy-off", (DB_PLAIN,), {"enabled": False})
        if "pgbouncer" in need:
            self.start_pgbouncer("pgbouncer", (DB_PLAIN,))
        if "tvproxy-notview-on" in need:
            self.start_tvproxy(
                "tvproxy-notview-on", (DB_NOTVIEW,), {"enabled": True, "schema": "tvproxy"}
            )
        if "tvproxy-notview-off" in need:
            self.start_tvproxy("tvproxy-notview-off", (DB_NOTVIEW,), {"enabled": False})
        self.targets["direct"] = Target("direct", c.host, c.port, dbname=DB_PLAIN)
        self.targets["triggers"] = Target("triggers", c.host, c.port, dbname=DB_TRIG)
        self.targets["stmt-triggers"] = Target("stmt-triggers", c.host, c.port, dbname=DB_STMT)
        for db in (*on_dbs, DB_TRIG, DB_STMT):
            self.psql(c.port, db, "VACUUM ANALYZE", timeout=3600)
        for name in TARGETS:
            t = self.targets.get(name)
            if t is not None and name in need:
                self.psql(t.port, t.dbname, "SELECT 1")
        self.script_files: dict[str, Path] = {}
        for name, text in scripts().items():
            path = self.workdir / f"{name}.sql"
            path.write_text(text)
            path.chmod(0o644)
            self.script_files[name] = path
        self.pgbench_runs = 0  # numbers hot-insert's key ranges
        self.setup_s = round(time.monotonic() - t0, 1)
        self.oracle_before = self.oracle()
        print(f"setup done in {self.setup_s}s; oracle: {_oracle_line(self.oracle_before)}")

    # ---- observations

    def oracle(self, dbs: tuple[str, ...] | None = None) -> dict[str, dict[str, int]]:
        """Rows differing between tv_x and v_x (both ways), per database and TVIEW (default:
        every database with TVIEWs)."""
        assert self.cluster is not None
        out: dict[str, dict[str, int]] = {}
        for db in dbs if dbs is not None else (*self.fresh_dbs, DB_PLAIN):
            out[db] = {}
            for e in TVIEWS:
                cols = ", ".join((f"pk_{e}", *TVIEW_COLUMNS[e]))
                sql = (
                    f"SELECT count(*) FROM ((SELECT {cols} FROM tv_{e} EXCEPT "
                    f"SELECT {cols} FROM v_{e}) UNION ALL (SELECT {cols} FROM v_{e} EXCEPT "
                    f"SELECT {cols} FROM tv_{e})) d"
                )
                out[db][f"tv_{e}"] = int(self.psql(self.cluster.port, db, sql, timeout=1800))
        return out

    def stale_rows(self, dbs: tuple[str, ...]) -> dict[str, dict[str, int]]:
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
                out[db][f"tv_{e}"] = int(self.psql(self.cluster.port, db, sql, timeout=1800))
        return out

    def tv_writes(self) -> dict[str, dict[str, int]]:
        """Row writes (ins + upd + del) so far on each tv_ table, per database."""
        assert self.cluster is not None
        out: dict[str, dict[str, int]] = {}
        for db in (*self.fresh_dbs, DB_PLAIN):
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
        """Close tvproxy-on's idle server connections to its TVIEW databases (admin RECONNECT)
        and wait until those backends are gone: a backend flushes its table statistics when it
        exits, whereas an idle pooled one may keep them pending for seconds (db trig and stmt
        are written by pgbench's own backends, which exit). The next warm-up reconnects."""
        assert self.cluster is not None
        t = self.targets.get("tvproxy-on")
        if t is None or not t.alive():
            return
        dbs = [db for db in (DB_TVIEW, DB_TVIEW10) if db in self.fresh_dbs]
        for db in dbs:
            self.admin(t, f"RECONNECT {db}")
        names = ", ".join(f"'{db}'" for db in dbs)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n = int(
                self.psql(
                    self.cluster.port,
                    "postgres",
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    f" AND datname IN ({names}) AND query NOT ILIKE 'LISTEN%'",
                )
            )
            if n == 0:
                return
            time.sleep(0.1)

    def tview_stats(self, db: str = DB_TVIEW) -> dict[str, dict[str, int]]:
        """tvproxy-on's SHOW TVIEW STATS for one database (numeric columns), per tview ('*' =
        all)."""
        t = self.targets.get("tvproxy-on")
        if t is None or not t.alive() or db not in self.fresh_dbs:
            return {}
        text = self.admin(t, "SHOW TVIEW STATS")
        out: dict[str, dict[str, int]] = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("database") != db:
                continue
            out[row["tview"]] = {
                k: int(v) for k, v in row.items() if v and v.lstrip("-").isdigit() and k
            }
        return out

    # ---- measuring

    def run_one(self, t: Target, workload: str, mode: str, clients: int, secs: int) -> dict:
        if workload == NOTVIEW_WORKLOAD:
            argv = ["-S"]
        else:
            sz = self.sizes(t.name)
            self.pgbench_runs += 1
            argv = [
                "-f",
                str(self.script_files[SCRIPT_OF.get(workload, workload)]),
                "-D",
                f"nposts={sz['posts']}",
                "-D",
                f"nusers={sz['users']}",
                "-D",
                f"nbulk={max(1, sz['posts'] - 999)}",
                # hot-insert: keys base + client_id * stride + n, unique over the whole run
                "-D",
                f"base={HOT_INSERT_BASE + self.pgbench_runs * 100 * HOT_INSERT_STRIDE}",
                "-D",
                "n=0",
            ]
        # a deadlock between two writers is retried (pgbench 15+), not a failed client
        argv += ["--max-tries", "10"]
        pm = self.postmaster_pid()
        try:
            before = _children(pm) if pm else set()
            pg0 = cluster_cpu(pm) if pm else None
            px0 = _proc_cpu(t.proc.pid) if t.proc is not None else None
        except OSError:
            pg0 = px0 = None
        res = self.pgbench_exec(t, argv, mode, clients, secs)
        n = res.get("transactions") or 0
        try:
            if pg0 is not None and n:
                wait_reaped(pm, before)
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
        if a.scale_check:
            # one cell: the time of one bulk UPDATE, at --scale-clients, in the first mode
            cells.append((SCALE_WORKLOAD, a.modes[0], a.scale_clients))
        results = []
        for i, (workload, mode, clients) in enumerate(cells, 1):
            names = self.cell_targets(workload)
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
            stats_dbs = {n: PROXY_STATS_DB[n] for n in names if n in PROXY_STATS_DB}
            self.flush_pool_stats()
            writes0 = self.tv_writes()
            stats0 = {n: self.tview_stats(db) for n, db in stats_dbs.items()}
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
            writes1 = self.tv_writes()
            stats1 = {n: self.tview_stats(db) for n, db in stats_dbs.items()}
            cell["refresh_work"] = refresh_work(cell, writes0, writes1, stats0, stats1)
            if a.cell_oracle:
                t0 = time.monotonic()
                dbs = tuple(dict.fromkeys(FRESH_DB[n] for n in names if n in FRESH_DB))
                cell["stale_after"] = self.stale_rows(dbs) if dbs else {}
                cell["oracle_s"] = round(time.monotonic() - t0, 2)
            summarize(cell)
            print("  " + summary_line(cell), flush=True)
            results.append(cell)
        return results


# -- where the time of one refresh goes -----------------------------------------------------------

# name: (keys touched as the proxy would record them: entity -> "x" (a random post), "y" (a
# random user), "bulk" (posts s .. s + 999), "new" (a new post's key); the base statements, with
# {x} {y} {s} {e} {n} filled in). All of it runs in rolled-back transactions.
PROFILE_CASES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
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
    "same-row-x100": (
        {"user": "y"},
        tuple(
            f"UPDATE tb_user SET email = email || '{i}' WHERE pk_user = {{y}}" for i in range(100)
        ),
    ),
    "bulk-1000": (
        {"post": "bulk"},
        ("UPDATE tb_post SET title = title || '!' WHERE pk_post BETWEEN {s} AND {e}",),
    ),
    "hot-insert": (
        {"post": "new"},
        ("INSERT INTO tb_post (pk_post, fk_user, title) VALUES ({n}, 1, 'hot')",),
    ),
}
_EXPLAINABLE = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "MERGE", "TABLE")
_WRITES_TV = re.compile(
    r'\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(?:"?\w+"?\.)?"?(tv_\w+)"?', re.IGNORECASE
)


class ProfileSkip(Exception):
    """The engine's planner no longer fits how the profile calls it: skip, with a note."""


def _sql_literal(v: object) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list | tuple | set | frozenset):
        items = sorted(v, key=str) if isinstance(v, set | frozenset) else list(v)
        inner = ",".join(
            "NULL" if x is None else '"' + str(x).replace("\\", "\\\\").replace('"', '\\"') + '"'
            for x in items
        )
        return "'{" + inner.replace("'", "''") + "}'"
    if isinstance(v, bytes | bytearray | memoryview):
        v = bytes(v).decode()
    return "'" + str(v).replace("'", "''") + "'"


def _literal_params(sql: str, params: tuple[object, ...] | list[object]) -> str:
    for i in range(len(params), 0, -1):  # $10 before $1
        sql = sql.replace(f"${i}", _sql_literal(params[i - 1]))
    return sql


def _stmt_label(i: int, sql: str) -> str:
    """A statement of the plan by its position and what it does, without assuming the plan's
    shape (the planner may change): #i, its first word, then what it was seen to contain
    (advisory locks, key sets, the tv_ tables it writes)."""
    words = sql.split()
    head = words[0].upper() if words else "?"
    what = []
    if "pg_advisory_xact_lock" in sql:
        what.append("advisory locks")
    if "set_config" in sql:
        what.append("key sets")
    written = list(dict.fromkeys(m.group(1) for m in _WRITES_TV.finditer(sql)))
    if written:
        what.append("writes " + ", ".join(written))
    if not what:
        what.append(" ".join(words[1:3])[:30])
    return f"#{i} {head} {' + '.join(what)}".strip()


def _plan(plan_refresh: Any, rt: Any, keys: dict[str, set[int]]) -> Any:
    """Call tvproxy's planner with what its signature asks for, by parameter name."""
    known: dict[str, Any] = {
        "touched": keys,
        "lock_namespace": 0x7476,
        "max_depth": 100,
    }
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, p in inspect.signature(plan_refresh).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in known:
            value = known[name]
        elif hasattr(rt, name):
            value = getattr(rt, name)
        elif p.default is not p.empty:
            continue
        else:
            raise ProfileSkip(f"plan_refresh() takes a parameter {name!r} the profile cannot fill")
        if p.kind is p.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    return plan_refresh(*args, **kwargs)


async def _explain(conn: Any, sql: str) -> tuple[float, float, float]:
    """(planning ms, execution ms, of which in triggers ms) of one statement, run for real."""
    words = sql.lstrip().split(None, 1)
    if not words or words[0].upper() not in _EXPLAINABLE:
        t0 = time.perf_counter()
        await conn.execute(sql)
        return 0.0, (time.perf_counter() - t0) * 1e3, 0.0
    top = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql))[0]
    trig = sum(t.get("Time", 0.0) for t in top.get("Triggers", ()))
    return top.get("Planning Time", 0.0), top.get("Execution Time", 0.0), trig


async def _profile(
    host: str, port: int, users: int, posts: int, reps: int, cases: list[str]
) -> dict[str, Any]:
    """EXPLAIN ANALYZE (in rolled-back transactions) of the refresh tvproxy would inject for one
    transaction of each workload, in db tview, and of the same writes in db trig and db stmt,
    where the per-row and the statement triggers run inside the writes. Uses tvproxy's own
    planner, so the statements are the ones the proxy sends; their literal parameters make each
    EXPLAIN plan afresh, so planning time shows what a first execution costs (the proxy prepares
    them once per server and PostgreSQL reuses a generic plan, as plpgsql does the triggers'). The plan's statements are labelled by position and first words, so a
    different plan shape still profiles; a planner that cannot be called skips the profile."""
    import random

    import asyncpg

    try:
        from tvproxy.tview.ddl import load_runtime
        from tvproxy.tview.planner import plan_refresh
    except ImportError as e:
        raise ProfileSkip(f"tvproxy's planner is not importable: {e}") from e

    rnd = random.Random(42)
    out: dict[str, Any] = {}
    tv = await asyncpg.connect(host=host, port=port, user=USER, database=DB_TVIEW)
    tr = await asyncpg.connect(host=host, port=port, user=USER, database=DB_TRIG)
    st = await asyncpg.connect(host=host, port=port, user=USER, database=DB_STMT)
    try:
        rt = await load_runtime(tv, "tvproxy")
        for case in cases:
            if case not in PROFILE_CASES:
                continue
            touch, base_sql = PROFILE_CASES[case]
            per_stmt: dict[str, dict[str, list[float]]] = {}
            base: dict[str, dict[str, list[float]]] = {
                db: {"statements_ms": [], "trigger_ms": []} for db in (DB_TRIG, DB_STMT)
            }
            notes: list[str] = []
            try:
                for rep in range(reps):
                    s = rnd.randint(1, max(1, posts - 999))
                    v = {
                        "x": rnd.randint(1, posts),
                        "y": rnd.randint(2, users),
                        "s": s,
                        "e": s + 999,
                        "n": HOT_INSERT_BASE - 1 - rep,
                    }
                    spans = {
                        "x": {v["x"]},
                        "y": {v["y"]},
                        "bulk": set(range(s, min(s + 1000, posts + 1))),
                        "new": {v["n"]},
                    }
                    keys = {e: spans[k] for e, k in touch.items()}
                    sqls = [q_.format(**v) for q_ in base_sql]
                    plan = _plan(plan_refresh, rt, keys)
                    statements = list(getattr(plan, "statements", ()) or ()) if plan else []
                    params = list(getattr(plan, "params", ()) or ()) if plan else []
                    if plan is None or not statements:
                        notes.append("the planner returned no plan")
                        break
                    if not params:
                        params = [() for _ in statements]
                    if len(params) != len(statements):
                        notes.append("the plan's statements and parameters do not pair up")
                        break
                    # the base writes first, as in the client's transaction; all rolled back
                    await tv.execute("BEGIN")
                    try:
                        for q_ in sqls:
                            await tv.execute(q_)
                        for i, (sql, prm) in enumerate(zip(statements, params, strict=True)):
                            pl, ex, _ = await _explain(tv, _literal_params(sql, tuple(prm or ())))
                            d = per_stmt.setdefault(
                                _stmt_label(i, sql), {"planning_ms": [], "execution_ms": []}
                            )
                            d["planning_ms"].append(pl)
                            d["execution_ms"].append(ex)
                    except asyncpg.PostgresError as e:
                        notes.append(f"a plan statement failed: {type(e).__name__}: {e}")
                        break
                    finally:
                        await tv.execute("ROLLBACK")
                    for db, conn in ((DB_TRIG, tr), (DB_STMT, st)):
                        await conn.execute("BEGIN")
                        try:
                            tot = tg = 0.0
                            for q_ in sqls:
                                pl, ex, t_ = await _explain(conn, q_)
                                tot += pl + ex
                                tg += t_
                            base[db]["statements_ms"].append(tot)
                            base[db]["trigger_ms"].append(tg)
                        finally:
                            await conn.execute("ROLLBACK")
            except ProfileSkip:
                raise
            except Exception as e:  # noqa: BLE001 - one case's failure is a note, not fatal
                notes.append(f"{type(e).__name__}: {e}")
                with contextlib.suppress(Exception):
                    for conn in (tv, tr, st):
                        await conn.execute("ROLLBACK")

            def med(xs: list[float]) -> float | None:
                return round(statistics.median(xs), 3) if xs else None

            stmts = {k: {m: med(x) for m, x in d.items()} for k, d in per_stmt.items()}
            out[case] = {
                "samples": reps,
                "tvproxy_statements": stmts,
                "tvproxy_planning_ms": round(sum(d["planning_ms"] or 0 for d in stmts.values()), 3),
                "tvproxy_execution_ms": round(
                    sum(d["execution_ms"] or 0 for d in stmts.values()), 3
                ),
                "triggers_statements_ms": med(base[DB_TRIG]["statements_ms"]),
                "triggers_in_trigger_ms": med(base[DB_TRIG]["trigger_ms"]),
                "stmt_triggers_statements_ms": med(base[DB_STMT]["statements_ms"]),
                "stmt_triggers_in_trigger_ms": med(base[DB_STMT]["trigger_ms"]),
            }
            if notes:
                out[case]["note"] = notes[0]
    finally:
        await tv.close()
        await tr.close()
        await st.close()
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
        ("tvproxy-on", "stmt-triggers"),
        ("tvproxy-on", "direct"),
        ("stmt-triggers", "triggers"),
        ("tvproxy-notview-on", "tvproxy-notview-off"),
        ("tvproxy-on-10x", "tvproxy-on"),
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
    if {"tvproxy-on-10x", "tvproxy-on"} <= set(cell["targets"]):
        # the scale check: how much longer one bulk UPDATE takes on the 10x fixture
        l10, l1 = lat.get("tvproxy-on-10x"), lat.get("tvproxy-on")
        cell["ratios"][TIME_RATIO] = round(l10 / l1, 3) if l10 and l1 else None
        by_run = {
            r["run"]: r["latency_ms"]
            for r in cell["runs"].get("tvproxy-on", [])
            if r.get("latency_ms") and not r.get("error")
        }
        xs = [
            r["latency_ms"] / by_run[r["run"]]
            for r in cell["runs"].get("tvproxy-on-10x", [])
            if r.get("latency_ms") and not r.get("error") and r["run"] in by_run
        ]
        cell["ratios_paired_median"][TIME_RATIO] = round(statistics.median(xs), 3) if xs else None


def refresh_work(
    cell: dict[str, Any],
    writes0: dict[str, dict[str, int]],
    writes1: dict[str, dict[str, int]],
    stats0: dict[str, dict[str, dict[str, int]]],
    stats1: dict[str, dict[str, dict[str, int]]],
) -> dict[str, Any]:
    """What keeping the tv_ tables fresh cost per transaction, over the whole cell (warm-up
    included): tv_ row writes per transaction for every refreshing target (tvproxy-on,
    triggers, stmt-triggers, tvproxy-on-10x), and tvproxy-on's refresh statements per COMMIT
    (``stats``: target -> SHOW TVIEW STATS of its database)."""

    def xacts(name: str) -> int:
        runs = cell["runs"].get(name, [])
        return sum(r.get("transactions") or 0 for r in runs) + cell["warmup_transactions"].get(
            name, 0
        )

    out: dict[str, Any] = {}
    for name, db in FRESH_DB.items():
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
    for name in PROXY_STATS_DB:
        s1, s0 = stats1.get(name) or {}, stats0.get(name) or {}
        if not s1.get("*") or name not in out:
            continue
        d = {k: s1["*"].get(k, 0) - s0.get("*", {}).get(k, 0) for k in s1["*"]}
        commits = d.get("commits", 0)
        per_tview = {
            tv: s1[tv].get("refresh_statements", 0) - s0.get(tv, {}).get("refresh_statements", 0)
            for tv in s1
            if tv != "*"
        }
        rows = sum(
            s1[tv].get(k, 0) - s0.get(tv, {}).get(k, 0)
            for tv in s1
            if tv != "*"
            for k in ("rows_refreshed", "rows_deleted")
        )
        out[name]["show_tview_stats"] = {
            "commits_with_refresh": commits,
            "refresh_statements": d.get("refresh_statements", 0),
            "refresh_statements_per_commit": round(d.get("refresh_statements", 0) / commits, 2)
            if commits
            else None,
            "refresh_statements_per_tview": per_tview,
            # one refresh statement per TVIEW and commit is the target (1.00 each)
            "refresh_statements_per_commit_per_tview": {
                tv: round(v / commits, 2) for tv, v in sorted(per_tview.items()) if v
            }
            if commits
            else {},
            "rows_written_per_commit": round(rows / commits, 2) if commits else None,
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
    a, b, label = HEADLINE[cell["workload"]]
    key = TIME_RATIO if cell["workload"] == SCALE_WORKLOAD else f"{a}/{b}"
    extra = [f"{label}={_fmt_ratio(r.get(key))}"]
    extra += [
        f"{k}={_fmt_ratio(v)}" for k, v in r.items() if k.startswith("tvproxy-on/") and k != key
    ]
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


def _cell_key(c: dict[str, Any]) -> str:
    return f"{c['mode']}/{c['clients']}"


def _check(v: float, op: str, bound: float) -> bool:
    return v >= bound if op == ">=" else v <= bound


def ceiling(cell: dict[str, Any]) -> float | None:
    """What the cell's headline ratio could reach if the TVIEW engine cost the proxy nothing and
    the refresh cost PostgreSQL what the per-row triggers' refresh costs it (TPS medians of
    the same cell; a TPS stands for 1 / the machine's cost of one transaction):

    - on ÷ off (write-txn, autocommit, hot-insert): the refresh's cost in the database, 1/triggers
      - 1/direct, added to tvproxy-off's whole cost: (1/off) / (1/off + 1/triggers - 1/direct);
    - same-row-xN (TVIEWs ÷ triggers): the triggers refresh the row's TVIEWs N times, the
      coalesced COMMIT once, at the same cost: (1/triggers) / (1/off + (1/triggers -
      1/direct) / N); without a direct run, a refresh that costs nothing: off ÷ triggers;
    - bulk-1000 (TVIEWs ÷ triggers): every key is refreshed once both ways, so only a refresh
      that costs nothing bounds it: tvproxy-off ÷ triggers.
    None when a target it needs was not run."""
    tps = cell["median_tps"]
    num, den, _ = HEADLINE.get(cell["workload"], ("", "", ""))
    if (num, den) == ("tvproxy-on", "tvproxy-off"):
        off, trig, direct = tps.get("tvproxy-off"), tps.get("triggers"), tps.get("direct")
        if not (off and trig and direct):
            return None
        return (1 / off) / (1 / off + max(1 / trig - 1 / direct, 0.0))
    if (num, den) == ("tvproxy-on", "triggers"):
        off, trig, direct = tps.get("tvproxy-off"), tps.get("triggers"), tps.get("direct")
        if not (off and trig):
            return None
        n = COALESCED.get(cell["workload"])
        if n and direct:
            return (1 / trig) / (1 / off + max(1 / trig - 1 / direct, 0.0) / n)
        return off / trig
    return None


def targets_table(cells: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """DESIGN.md's benchmark targets, each with its measured ratios (per query mode / client
    count) and a verdict: met when every cell of the workload meets every bound (and the modes
    the target names were all measured), not met otherwise."""
    rows = []
    for what, workload, measure, bounds, target, modes in TARGET_ROWS:
        wc = [c for c in cells if c["workload"] == workload]
        measured: list[str] = []
        ok = True
        missing_values = False
        for key, op, bound in bounds:
            vals = [(c, c["ratios"].get(key)) for c in wc]
            part = ", ".join(f"{_cell_key(c)}: {_fmt_ratio(v)}" for c, v in vals)
            if len(bounds) > 1:
                who = key.split("/", 1)[1]
                part = f"÷ {who}: {part}"
            measured.append(part)
            for _, v in vals:
                if v is None:
                    missing_values = True
                elif not _check(v, op, bound):
                    ok = False
        # tvproxy-on's databases: a baseline's staleness (the per-row triggers race under
        # concurrency) is reported in the headline table, it does not fail tvproxy's target
        stale = [c for c in wc if _stale_tvproxy(c)]
        missing_modes = [m for m in modes if m not in {c["mode"] for c in wc}]
        if not wc:
            verdict = (
                "not measured (run with --scale-check)"
                if workload == SCALE_WORKLOAD
                else "not measured"
            )
        elif stale:
            verdict = (
                "**not met** (tv_ tables stale after "
                + ", ".join(_cell_key(c) for c in stale)
                + ")"
            )
        elif not ok:
            verdict = "**not met**"
        elif missing_values:
            verdict = "incomplete (a ratio is missing)"
        elif missing_modes:
            verdict = "met where measured (" + ", ".join(missing_modes) + " not run)"
        else:
            verdict = "met"
        notes = []
        for c in wc:
            st = c.get("refresh_work", {}).get("tvproxy-on", {}).get("show_tview_stats", {})
            if st.get("refresh_statements_per_commit") is not None:
                per = ", ".join(
                    f"{k} {v:.2f}"
                    for k, v in (st.get("refresh_statements_per_commit_per_tview") or {}).items()
                )
                notes.append(
                    f"{_cell_key(c)}: {st['refresh_statements_per_commit']:.2f}"
                    + (f" ({per})" if per else "")
                )
        ceilings = [(c, ceiling(c)) for c in wc]
        rows.append(
            {
                "what": what,
                "workload": workload,
                "measure": measure,
                "target": target,
                "measured": "; ".join(measured) if wc else "—",
                "ceiling": ", ".join(f"{_cell_key(c)}: {_fmt_ratio(v)}" for c, v in ceilings
                                     if v is not None) or "—",
                "verdict": verdict,
                "refresh_statements_per_commit": "; ".join(notes),
            }
        )
    return rows


def _used_targets(cells: list[dict[str, Any]]) -> list[str]:
    used = {n for c in cells for n in c["targets"]}
    return [n for n in TARGETS if n in used]


def render_md(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    cells = report["cells"]
    used = _used_targets(cells)
    fresh_dbs = s.get("fresh_databases") or [DB_TVIEW, DB_TRIG]
    scale = (
        f" The scale check's 10x fixture (db {DB_TVIEW10}): x {s.get('scale_factor', 10)}."
        if (s.get("scale_check"))
        else ""
    )
    lines = [
        f"# TVIEW write overhead — {report['started_at']}",
        "",
        f"Command: `{report['command'].strip()}`",
        "",
        f"Fixture F x {s['companies']:,} companies, {s['users']:,} users, {s['posts']:,} posts, "
        f"{s['comments']:,} comments (tv_user.data includes email; tb_ fk columns indexed), "
        f"copied into the databases tview, plain, trig and stmt. TVIEWs tv_company, tv_user, "
        f"tv_post.{scale} PostgreSQL "
        f"throwaway cluster (fsync off, synchronous_commit off), poolers in transaction mode, "
        f"pool size {s['pool_size']}, all on 127.0.0.1. Each cell: median of {s['runs']} runs "
        f"of {s['duration']} s per target, rounds interleaved (order rotated each round), "
        f"warm-up {s['warmup']} s per target not counted, `-j {s['jobs']}`, pgbench "
        f"`--max-tries 10`. Setup took {report.get('setup_s')} s.",
        "",
        "Targets:",
        "",
        *(f"- `{n}`: {TARGET_DESC[n]}" for n in used),
        "",
        "## Targets (DESIGN.md §8)",
        "",
        "Ratios of the median TPS (the scale check: of the median latency), per query mode / "
        "client count. Met = every measured cell meets the bound and the tv_ tables were fresh "
        "after it. Refresh statements per commit from tvproxy-on's `SHOW TVIEW STATS` (the "
        "target is one per TVIEW the commit touched). Ceiling: what the ratio could be if the "
        "engine cost the proxy nothing and a refresh cost PostgreSQL what the per-row "
        "triggers' refresh costs it (on ÷ off: (1/off) / (1/off + 1/triggers − 1/direct); "
        "same-row-xN ÷ triggers: one refresh where the triggers run N, (1/triggers) / "
        "(1/off + (1/triggers − 1/direct) / N); bulk ÷ triggers: tvproxy-off ÷ triggers, "
        "i.e. the proxy hop alone).",
        "",
        "| workload | ratio | target | measured | ceiling | verdict |"
        " tvproxy-on refresh stmts/commit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.get("targets") or targets_table(cells, s):
        lines.append(
            f"| {r['what']} (`{r['workload']}`) | {r['measure']} | {r['target']} | "
            f"{r['measured']} | {r.get('ceiling', '—')} | {r['verdict']} | "
            f"{r['refresh_statements_per_commit'] or '—'} |"
        )
    lines += [
        "",
        "## Headline",
        "",
        "Per cell, the workload's headline ratio: on / off = TPS tvproxy-on / TPS tvproxy-off "
        "(the same proxy with `[tview] enabled` true vs false; 1.00 = free); TVIEWs / per-row "
        "triggers = tvproxy-on / triggers (coalescing at COMMIT vs a refresh per row event); "
        "enabled true / false = the two tvproxy instances in front of db notview, which has no "
        "TVIEWs; latency 10x / 1x = the bulk UPDATE's latency through tvproxy-on on the 10x "
        "fixture over the 1x one (lower is better).",
        "",
        "| workload | mode | clients | headline | ratio | same-round median | "
        "tvproxy-on / triggers | tvproxy-on / stmt-triggers | tvproxy-on / direct | "
        "tv_ fresh after the cell |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        r, p = c["ratios"], c["ratios_paired_median"]
        a, b, label = HEADLINE[c["workload"]]
        key = TIME_RATIO if c["workload"] == SCALE_WORKLOAD else f"{a}/{b}"
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | {label} | "
            f"{_fmt_ratio(r.get(key))} | {_fmt_ratio(p.get(key))} | "
            f"{_fmt_ratio(r.get('tvproxy-on/triggers'))} | "
            f"{_fmt_ratio(r.get('tvproxy-on/stmt-triggers'))} | "
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
        "| workload | mode | clients | " + " | ".join(used) + " |",
        "|---|---|---:|" + "---:|" * len(used),
    ]
    for c in cells:
        row = []
        for n in used:
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
        "| workload | mode | clients | " + " | ".join(used) + " |",
        "|---|---|---:|" + "---:|" * len(used),
    ]
    for c in cells:
        row = []
        for n in used:
            if n not in c["targets"] or c["status"].get(n) == UNSUPPORTED:
                row.append("")
                continue
            pg = c.get("median_pg_cpu_ms_per_xact", {}).get(n)
            px = c.get("median_pooler_cpu_ms_per_xact", {}).get(n)
            row.append(_fmt(pg, ".2f") + (f" + {px:.2f}" if px is not None else ""))
        lines.append(
            f"| {c['workload']} | {c['mode']} | {c['clients']} | " + " | ".join(row) + " |"
        )
    other = [k for k in _ratio_keys(cells) if not k.startswith("tvproxy-on/")]
    if other:
        lines += [
            "",
            "Other ratios of the medians:",
            "",
            "| workload | mode | clients | " + " | ".join(other) + " |",
            "|---|---|---:|" + "---:|" * len(other),
        ]
        for c in cells:
            if not any(k in c["ratios"] for k in other):
                continue
            lines.append(
                f"| {c['workload']} | {c['mode']} | {c['clients']} | "
                + " | ".join(_fmt_ratio(c["ratios"].get(k)) for k in other)
                + " |"
            )
    lines += [
        "",
        "## Refresh work per transaction",
        "",
        "tv_ row writes per transaction from `pg_stat_user_tables` (inserts + updates + deletes "
        "on tv_company/tv_user/tv_post, over the whole cell including warm-up); tvproxy's "
        "refresh statements per COMMIT from `SHOW TVIEW STATS` (the target: one per TVIEW "
        "touched; per TVIEW in parentheses). Nothing writes the tv_ tables of db plain (the "
        "'plain' column must be 0).",
        "",
        "| workload | mode | clients | tvproxy tv rows/xact | (proxy's count) | "
        "refresh stmts/commit | commits refreshed / xacts | avg refresh µs | "
        "triggers tv rows/xact | stmt-triggers tv rows/xact | plain tv writes |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        w = c.get("refresh_work", {})
        if not any(n in w for n in FRESH_DB):
            continue
        proxies = [n for n in PROXY_STATS_DB if n in w] or [None]
        for pname in proxies:
            on = w.get(pname, {}) if pname else {}
            st = on.get("show_tview_stats", {})
            refreshed = (
                f"{st['commits_with_refresh']:,} / {on['transactions']:,}"
                if st.get("commits_with_refresh") is not None and on.get("transactions")
                else "—"
            )
            per = ", ".join(
                f"{k} {v:.2f}"
                for k, v in (st.get("refresh_statements_per_commit_per_tview") or {}).items()
            )
            stmts = _fmt(st.get("refresh_statements_per_commit"), ".2f") + (
                f" ({per})" if per else ""
            )
            label = c["workload"] + (" (10x)" if pname == "tvproxy-on-10x" else "")
            first = pname == proxies[0]
            tr, sr = w.get("triggers", {}), w.get("stmt-triggers", {})
            lines.append(
                f"| {label} | {c['mode']} | {c['clients']} | "
                f"{_fmt(on.get('tv_row_writes_per_xact_total'), '.2f')} | "
                f"{_fmt(st.get('rows_written_per_commit'), '.2f')} | {stmts} | {refreshed} | "
                f"{_fmt(st.get('avg_refresh_us'), ',.0f')} | "
                f"{_fmt(tr.get('tv_row_writes_per_xact_total'), '.2f') if first else ''} | "
                f"{_fmt(sr.get('tv_row_writes_per_xact_total'), '.2f') if first else ''} | "
                f"{w.get('plain_tv_row_writes', '—') if first else ''} |"
            )
    lines += [
        "",
        "Expected per transaction when every refresh happens: write-txn 1 tv_post row + 1 "
        "tv_user row + that user's tv_post rows (5 at the default sizes) = 7; autocommit 1; "
        "same-row-x10 / x100: tvproxy 6 (one refresh at COMMIT), per-row triggers 60 / 600 "
        "(every UPDATE refreshes the user and its posts again); bulk-1000: 1,000 tv_post rows "
        "everywhere, tvproxy in one refresh statement; hot-insert: 1 new tv_post row. tvproxy "
        "skips rows whose content did not change, the triggers rewrite them (full "
        "replacement, as pg_tviews).",
    ]
    prof = report.get("refresh_profile") or {}
    if prof:
        lines += ["", "## Where one refresh's time goes (EXPLAIN ANALYZE, medians)", ""]
        if "error" in prof or "skipped" in prof:
            lines.append(
                f"Profile skipped: {prof.get('skipped') or prof.get('error')} (the benchmark "
                "itself is unaffected)."
            )
        else:
            lines += [
                "One transaction of each workload on random keys (7 samples), in rolled-back "
                "transactions, with no benchmark traffic running (the machine's other load "
                "still applies): tvproxy's injected statements (built by tvproxy's own "
                "planner; the proxy prepares them once per server and runs a generic plan, so "
                "their planning here is a first execution's; labelled #position, first word, "
                "what they write) in db tview; the "
                "same writes in db trig and db stmt, where the per-row or statement triggers "
                "run inside them (plpgsql caches their plans).",
                "",
                "| workload | tvproxy statements: planning ms / execution ms | tvproxy total "
                "planning ms | tvproxy total execution ms | per-row triggers: write(s) total ms "
                "(in triggers) | statement triggers: write(s) total ms (in triggers) |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for case, d in prof.items():
                parts = "; ".join(
                    f"{k} {_fmt(v.get('planning_ms'), '.2f')} / "
                    f"{_fmt(v.get('execution_ms'), '.2f')}"
                    for k, v in d["tvproxy_statements"].items()
                )
                if d.get("note"):
                    parts = (parts + "; " if parts else "") + f"note: {d['note']}"
                lines.append(
                    f"| {case} | {parts or '—'} | {_fmt(d.get('tvproxy_planning_ms'), '.2f')} | "
                    f"{_fmt(d.get('tvproxy_execution_ms'), '.2f')} | "
                    f"{_fmt(d.get('triggers_statements_ms'), '.2f')} "
                    f"({_fmt(d.get('triggers_in_trigger_ms'), '.2f')}) | "
                    f"{_fmt(d.get('stmt_triggers_statements_ms'), '.2f')} "
                    f"({_fmt(d.get('stmt_triggers_in_trigger_ms'), '.2f')}) |"
                )
    ob, oa = report.get("oracle_before", {}), report.get("oracle_after", {})
    lines += [
        "",
        "## Correctness (oracle)",
        "",
        "Rows of `(tv_x EXCEPT v_x) UNION ALL (v_x EXCEPT tv_x)` per database, before the first "
        "and after the last run. `tview` (tvproxy-on), `trig` (triggers), `stmt` "
        "(stmt-triggers) and `tview10` (tvproxy-on-10x) must be 0; `plain` is written without "
        "any refresh, so its tv_ tables are expected to be stale.",
        "",
        "| database | "
        + " | ".join(f"tv_{e} before" for e in TVIEWS)
        + " | "
        + " | ".join(f"tv_{e} after" for e in TVIEWS)
        + " | verdict |",
        "|---|" + "---:|" * (2 * len(TVIEWS)) + "---|",
    ]
    for db in (*fresh_dbs, DB_PLAIN):
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
        "Run with `-D nposts=... -D nusers=... -D nbulk=<nposts - 999> -D base=<unique per "
        "pgbench run> -D n=0` (the sizes of the target's database). `select-only-notview` is "
        "pgbench's builtin `-S`; `bulk-1000-10x` runs `bulk-1000`.",
        "",
        *(
            line
            for name, text in report["scripts"].items()
            for line in (
                f"`{name}`:",
                "",
                "```",
                text.rstrip(),
                "```",
                "",
            )
        ),
    ]
    return "\n".join(lines) + "\n"


def _stale_tvproxy(c: dict[str, Any]) -> bool:
    o = c.get("stale_after") or {}
    return any(sum(o.get(db, {}).values()) for who, db in FRESH_DB.items()
               if who.startswith("tvproxy-on") and who in c["targets"])


def _fresh_cell(c: dict[str, Any]) -> str:
    o = c.get("stale_after")
    if not o:
        return "—"
    out = []
    for who, db in FRESH_DB.items():
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
        default=list(MODES),
        help="pgbench query modes (default simple,extended,prepared; PgBouncer 1.18 has no "
        "prepared statements in transaction mode: n/a there)",
    )
    p.add_argument("--clients", type=_int_list, default=[8], help="client counts (default 8)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="pgbench threads (default 2)")
    p.add_argument(
        "--targets",
        type=_choice_list(TVIEW_TARGETS),
        default=["direct", "pgbouncer", "tvproxy-off", "tvproxy-on", "triggers"],
        help="targets of workloads write-txn and autocommit (default direct,pgbouncer,"
        "tvproxy-off,tvproxy-on,triggers: triggers and direct give the ceiling; stmt-triggers "
        "possible)",
    )
    p.add_argument(
        "--b-targets",
        type=_choice_list(TVIEW_TARGETS),
        default=["tvproxy-on", "triggers", "tvproxy-off", "direct"],
        help="targets of same-row-x10 and same-row-x100 (default tvproxy-on,triggers,"
        "tvproxy-off,direct: tvproxy-off, triggers and direct give the ceiling)",
    )
    p.add_argument(
        "--bulk-targets",
        type=_choice_list(TVIEW_TARGETS),
        default=["tvproxy-on", "triggers", "stmt-triggers", "tvproxy-off"],
        help="targets of bulk-1000 (default tvproxy-on,triggers,stmt-triggers,tvproxy-off)",
    )
    p.add_argument(
        "--insert-targets",
        type=_choice_list(TVIEW_TARGETS),
        default=["direct", "pgbouncer", "tvproxy-off", "tvproxy-on", "triggers"],
        help="targets of hot-insert (default direct,pgbouncer,tvproxy-off,tvproxy-on,triggers)",
    )
    p.add_argument(
        "--scale-check",
        action="store_true",
        help="also load fixture F x --scale-factor (db tview10, TVIEWs through tvproxy-on) and "
        "run bulk-1000 through tvproxy-on on it and on the 1x fixture, interleaved (cell "
        "bulk-1000-10x: latency 10x / 1x). Off by default: loading 10x takes minutes",
    )
    p.add_argument(
        "--scale-factor",
        type=int,
        default=10,
        help="size of the scale check's fixture relative to --companies/--users/--posts/"
        "--comments (default 10)",
    )
    p.add_argument(
        "--scale-clients",
        type=int,
        default=1,
        help="clients of the scale check's cell (default 1: the time of one UPDATE, "
        "uncontended); it runs in the first of --modes",
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
        report["targets"] = targets_table(report["cells"], report["settings"])  # as now read
        md = write_reports(report, args.render.parent, report["started_at"])
        print(md.read_text())
        return 0
    if min(args.users, args.posts, args.companies, args.comments) <= 0:
        raise SystemExit("sizes must be positive")
    if args.users < 2:
        raise SystemExit("--users must be at least 2 (user 1 is hot-insert's)")
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
                    _profile(
                        bench.cluster.host,
                        bench.cluster.port,
                        args.users,
                        args.posts,
                        7,
                        [w for w in args.workloads if w in PROFILE_CASES],
                    )
                )
            except ProfileSkip as e:
                profile = {"skipped": str(e)}
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
            "bulk_targets": args.bulk_targets,
            "insert_targets": args.insert_targets,
            "scale_check": args.scale_check,
            "scale_factor": args.scale_factor,
            "scale_clients": args.scale_clients,
            "fresh_databases": list(bench.fresh_dbs),
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
        "stmt_trigger_sql": stmt_trigger_sql(),
        "tview_selects": {f"tv_{e}": tview_ddl(e) for e in TVIEWS},
    }
    report["targets"] = targets_table(cells, report["settings"])
    if crashed:
        report["crashed"] = crashed
    md = write_reports(report, args.out_dir, stamp)
    print("\n" + md.read_text())
    print(f"wrote {args.out_dir}/{stamp}-tview.{{json,md}} and {args.out_dir / 'latest-tview.md'}")
    bad = any(r.get("error") for c in cells for rs in c["runs"].values() for r in rs)
    stale = [db for db in bench.fresh_dbs if any(oracle_after.get(db, {}).values())]
    if stale:
        print(f"STALE: a tv_ table differs from its view in db {', '.join(stale)}", file=sys.stderr)
    return 2 if bad or stale else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
