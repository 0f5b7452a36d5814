"""Which statements open an opaque-writes audit (tview/opaque.py), without a server."""

from __future__ import annotations

from tvproxy.tview.opaque import function_pattern, is_opaque, reject_sql

FUNCS = function_pattern(frozenset({"rename_user", "bump$x"}))
TRIGGERED = frozenset({"tb_log"})


def test_opaque_statement_kinds() -> None:
    for sql in ("CALL p()", "do $$begin end$$", "  EXECUTE s(1)", "TRUNCATE tb_other CASCADE",
                "/* c */ call p()", "SELECT 1; CALL p()", "select rename_user(1, 'x')",
                "SELECT public.RENAME_USER (1, 'x')", "SELECT bump$x()",
                "INSERT INTO tb_log VALUES (1)", "with x as (delete from tb_log) select 1"):
        assert is_opaque(sql, FUNCS, TRIGGERED), sql


def test_plain_statements_are_not_opaque() -> None:
    for sql in ("SELECT 1", "UPDATE tb_post SET title = 'do' WHERE pk_post = 1",
                "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", "SELECT rename_users(1)",
                "SELECT xrename_user(1)", "SELECT * FROM tb_log", "SELECT 'call'",
                "SELECT my_rename_user(1)"):
        assert not is_opaque(sql, FUNCS, TRIGGERED), sql
    assert function_pattern(frozenset()) is None
    assert not is_opaque("SELECT f()", None, frozenset())


def test_reject_names_the_sqlstate() -> None:
    sql = reject_sql()
    assert sql.startswith("DO $$") and "'0A000'" in sql and "tvproxy.opaque" in sql
