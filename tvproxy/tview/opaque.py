"""Opaque writers: statements whose writes to tracked tables cannot be read from their text
(pure, no I/O).

CALL, DO, SQL-level EXECUTE, TRUNCATE (its CASCADE), volatile user functions, and writes to tables
with user triggers or referenced by cascading foreign keys may write tracked tables behind the
statement's back.  Such a statement opens an *audit span*: just before it, the proxy stores the
transaction's write counters of the tracked tables (``pg_stat_xact_user_tables``; PostgreSQL
counts per transaction while it runs) in a transaction-local setting; at the next other
statement, or before the refresh plan, one statement compares the counters with that baseline
minus what the proxy captured itself, and records the tables with unaccounted writes in the
setting ``tvproxy.opaque`` (oids) and returns them.

Both settings are transaction-local (``set_config(..., true)``), so ROLLBACK TO SAVEPOINT takes
back what was recorded after the savepoint, like the writes themselves.  The plan refreshes the
dependents of those tables fully (``opaque_writes = refresh``) or fails the COMMIT
(``reject``); when the proxy has not seen the comparison's answer yet, the plan reads the
setting itself (:func:`opaque_condition`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# first words of the statements of a text (a ';' inside a string only makes it more careful)
_LEAD = r"(?:^|;)\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*"
_OPAQUE_WORDS = re.compile(_LEAD + r"(call|do|execute|truncate)\b", re.IGNORECASE | re.DOTALL)
_WRITE_WORDS = re.compile(_LEAD + r"(insert|update|delete|merge|with|copy)\b",
                          re.IGNORECASE | re.DOTALL)

BASELINE_SETTING = "tvproxy.audit"
OPAQUE_SETTING = "tvproxy.opaque"
REJECT_SQLSTATE = "0A000"


@dataclass(frozen=True)
class OpaqueFacts:
    """What the database says about writers the proxy cannot see through."""

    functions: frozenset[str] = frozenset()  # volatile user functions and procedures
    trigger_tables: frozenset[str] = frozenset()  # user triggers, or cascading FKs point here
    track_counts: bool = True


def function_pattern(names: frozenset[str]) -> re.Pattern[str] | None:
    """A regex finding a call of one of ``names`` (``name(``, case-insensitive)."""
    if not names:
        return None
    alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w$])(?:{alts})\s*\(", re.IGNORECASE)


def is_opaque(sql: str, functions: re.Pattern[str] | None,
              trigger_tables: frozenset[str]) -> bool:
    """Can this text write tracked tables in ways its text does not show?"""
    if _OPAQUE_WORDS.search(sql):
        return True
    if functions is not None and functions.search(sql):
        return True
    if trigger_tables and _WRITE_WORDS.search(sql):
        low = sql.lower()
        return any(t in low for t in trigger_tables)
    return False


def baseline_sql() -> str:
    """Store the write counters of the tracked tables ``$1`` (regclass names)."""
    return (
        f"SELECT set_config('{BASELINE_SETTING}', coalesce((SELECT jsonb_object_agg(relid::text,"
        f" n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_xact_user_tables WHERE relid ="
        f" ANY($1::regclass[])), '{{}}')::text, true) IS NULL")


def close_sql() -> str:
    """Tables of ``$1`` written more than ``$2`` (allowance per table, -1: any) since the
    baseline: added to the setting, and returned as their positions in ``$1``."""
    base = f"nullif(current_setting('{BASELINE_SETTING}', true), '')::jsonb"
    return (
        "WITH t AS (SELECT r::regclass::oid AS relid, a, i FROM unnest($1::text[], $2::bigint[])"
        " WITH ORDINALITY u(r, a, i)),"
        " w AS (SELECT t.relid, t.i FROM t JOIN pg_stat_xact_user_tables s USING (relid)"
        " WHERE t.a >= 0 AND s.n_tup_ins + s.n_tup_upd + s.n_tup_del"
        f" - coalesce(({base} ->> t.relid::text)::bigint, 0) > t.a),"
        f" r AS (SELECT set_config('{OPAQUE_SETTING}', concat_ws(',',"
        f" nullif(current_setting('{OPAQUE_SETTING}', true), ''),"
        " (SELECT string_agg(relid::text, ',') FROM w)), true) AS v)"
        " SELECT w.i FROM w, r WHERE r.v IS NOT NULL")


def opaque_condition(table: str) -> str:
    """SQL true when ``table`` (a quoted, qualified name) had unaccounted writes."""
    lit = "'" + table.replace("'", "''") + "'"
    return (f"{lit}::regclass::oid::text = ANY(string_to_array(current_setting("
            f"'{OPAQUE_SETTING}', true), ','))")


def reject_sql() -> str:
    """Fail the COMMIT when the setting names tables with opaque writes (naming them)."""
    hint = "set [tview] opaque_writes = refresh to refresh the dependent TVIEWs fully instead"
    return (
        "DO $$DECLARE t text; BEGIN SELECT string_agg(DISTINCT x::oid::regclass::text, ', ')"
        f" INTO t FROM unnest(string_to_array(current_setting('{OPAQUE_SETTING}', true), ','))"
        " x WHERE x <> ''; IF t IS NOT NULL THEN RAISE EXCEPTION USING ERRCODE ="
        f" '{REJECT_SQLSTATE}', MESSAGE = format('tvproxy: writes to %s that the proxy cannot"
        " attribute to rows (CALL, DO, EXECUTE, functions, triggers or cascades) are rejected',"
        f" t), HINT = {_literal(hint)}; END IF; END$$")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
