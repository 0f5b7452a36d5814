"""TVIEW DDL recognition, column conventions and dependency order (pure)."""

from __future__ import annotations

import pytest

from tvproxy.tview.analyze import (
    CreateTview,
    DropTviews,
    TviewError,
    check_columns,
    parse_tview_ddl,
    refresh_order,
)


def test_create_tview_is_recognised_and_deparsed() -> None:
    got = parse_tview_ddl("create table tv_post as select p.pk_post, p.id, "
                          "jsonb_build_object('t', p.title) as data from tb_post p")
    assert isinstance(got, CreateTview)
    assert (got.entity, got.table, got.view) == ("post", "tv_post", "v_post")
    assert got.select_sql.startswith("SELECT p.pk_post, p.id, jsonb_build_object('t', p.title) AS data")


@pytest.mark.parametrize("sql", [
    "CREATE TABLE foo AS SELECT 1",
    "CREATE TABLE tv_x (a int)",
    "SELECT * FROM tv_post",
    "DROP TABLE tv_a, other",
    "CREATE TABLE tv_ AS SELECT 1",
    "create table tv_x as select 1; select 2",
])
def test_other_statements_are_not_tview_ddl(sql: str) -> None:
    assert parse_tview_ddl(sql) is None


def test_drop_forms() -> None:
    assert parse_tview_ddl("DROP TABLE IF EXISTS tv_a, public.tv_b CASCADE") == DropTviews(
        ("tv_a", "tv_b"), True, True)
    assert parse_tview_ddl("drop table tv_a") == DropTviews(("tv_a",), False, False)


def test_create_table_as_values_is_refused_with_42601() -> None:
    with pytest.raises(TviewError) as err:
        parse_tview_ddl("CREATE TABLE tv_x AS VALUES (1)")
    assert err.value.sqlstate == "42601"


def test_column_conventions() -> None:
    cols = check_columns("tv_post", [("pk_post", "bigint"), ("id", "uuid"), ("fk_user", "bigint"),
                                     ("user_id", "uuid"), ("data", "jsonb")])
    assert (cols.pk, cols.pk_type, cols.fks) == ("pk_post", "bigint", ("fk_user",))
    for bad, state in [([("id", "uuid"), ("data", "jsonb")], "42703"),
                       ([("pk_x", "int")], "42703"),
                       ([("pk_x", "int"), ("data", "json")], "42804"),
                       ([("pk_x", "int"), ("pk_x", "int"), ("data", "jsonb")], "42701")]:
        with pytest.raises(TviewError) as err:
            check_columns("tv_x", bad)
        assert err.value.sqlstate == state and "tv_x" in err.value.message


def test_refresh_order_dependencies_first_and_cycles_rejected() -> None:
    deps = {"post": {"user"}, "user": {"company"}, "company": set(), "comment": {"post", "user"}}
    order = refresh_order(deps)
    assert order.index("company") < order.index("user") < order.index("post") < order.index("comment")
    with pytest.raises(TviewError) as err:
        refresh_order({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert err.value.sqlstate == "55P03" and "a -> b -> c -> a" in err.value.message


def test_plan_binds_keys_and_quotes_identifiers() -> None:
    from tvproxy.tview.planner import TviewSpec, plan_refresh

    spec = TviewSpec('we"ird', 'tv_we"ird', 'v_we"ird', "pk_x", "bigint", ("pk_x", "data"))
    plan = plan_refresh({'we"ird': spec}, ['we"ird'], {'we"ird': {424242, 7}}, {'we"ird': "bigint"},
                        1)
    assert plan is not None and plan.entities == ('we"ird',)
    # a TVIEW fed only by its own base rows: no gate, just its refresh
    assert len(plan.statements) == 1 and plan.first_refresh == 0
    assert plan.params[0] == ([424242, 7],)
    assert all("424242" not in sql for sql in plan.statements)  # values are bound, never spliced
    refresh = plan.statements[plan.first_refresh]
    assert '"tv_we""ird"' in refresh and '"v_we""ird"' in refresh


def test_key_mapping_of_fixture_f() -> None:
    from tvproxy.tview.analyze import key_mapping

    user = key_mapping("user", ["pk_user", "id", "fk_company", "company_id", "data"],
                       {"tb_user": ["pk_user", "fk_company", "name"],
                        "tb_company": ["pk_company", "name"]}, {"company": frozenset({"tb_company"})})
    assert [(r.table, r.rule, r.column) for r in user.rules] == [
        ("tb_company", "embedding", "fk_company"), ("tb_user", "self", None)]
    post = key_mapping(
        "post", ["pk_post", "id", "fk_user", "user_id", "data"],
        {"tb_post": ["pk_post", "fk_user", "title"], "tb_comment": ["pk_comment", "fk_post"],
         "tb_user": ["pk_user", "fk_company"], "tb_company": ["pk_company", "name"]},
        {"user": frozenset({"tb_user", "tb_company"})})
    assert post.strategy == "incremental" and not post.warnings
    assert {(r.table, r.rule, r.column, r.via) for r in post.rules} == {
        ("tb_comment", "aggregation", "fk_post", None), ("tb_company", "transitive", None, "user"),
        ("tb_post", "self", None, None), ("tb_user", "embedding", "fk_user", None)}


def test_unmappable_source_makes_the_tview_full_with_a_warning() -> None:
    from tvproxy.tview.analyze import key_mapping

    got = key_mapping("post", ["pk_post", "data"],
                      {"tb_post": ["pk_post"], "tb_tag": ["pk_tag", "label"]}, {})
    assert got.strategy == "full"
    assert len(got.warnings) == 1 and "tb_tag" in got.warnings[0] and "tv_post" in got.warnings[0]
