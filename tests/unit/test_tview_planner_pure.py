"""The refresh planner's statements, without a database: which gate a plan shape gets."""

from __future__ import annotations

import dataclasses
import re

from tvproxy.tview.planner import TviewSpec, plan_refresh

TOUCH = '"tvproxy".touch_row'
SPECS = {
    "company": TviewSpec("company", "tv_company", "v_company", "pk_company", "bigint",
                         ("pk_company", "id", "data"), touch=TOUCH),
    "user": TviewSpec("user", "tv_user", "v_user", "pk_user", "bigint",
                      ("pk_user", "id", "fk_company", "data"), (("fk_company", "company"),),
                      touch=TOUCH),
    "post": TviewSpec("post", "tv_post", "v_post", "pk_post", "bigint",
                      ("pk_post", "id", "fk_user", "data"), (("fk_user", "user"),), touch=TOUCH),
}
ORDER = ["company", "user", "post"]
TYPES = {e: "bigint" for e in ORDER}
FK = {("post", "fk_user"): 'SELECT "fk_user" FROM "public"."tb_post" WHERE "pk_post" IN ({keys})',
      ("user", "fk_company"): 'SELECT "fk_company" FROM "public"."tb_user" WHERE "pk_user" IN '
                              '({keys})'}


def _gate(touched: dict[str, set[int]], specs: dict[str, TviewSpec] = SPECS) -> str:
    plan = plan_refresh(specs, ORDER, touched, TYPES, 100, fk_sources=FK)
    assert plan is not None and plan.first_refresh >= 1
    return plan.statements[0]


def test_one_key_gate_is_one_target_list_in_lock_order() -> None:
    gate = _gate({"post": {7}})
    assert gate.startswith("SELECT pg_advisory_xact_lock_shared(101, 2), ")
    assert "WITH" not in gate and "UPDATE" not in gate and "GROUP BY" not in gate
    assert "ORDER BY" not in gate  # nothing to sort, nothing for PostgreSQL to start in RC
    # company (rank 0) shared, then user (1) shared, then the post (2) exclusive
    order = [gate.index(f"hashtext('{r}:'") for r in (0, 1, 2)]
    assert order == sorted(order)
    assert "pg_advisory_xact_lock(100, hashtext('2:' || l0.k::bigint::text))" in gate
    # each key read once: the post's author from the post, the company from the author
    assert gate.count('FROM "public"."tb_post"') == 1 and gate.count('FROM "public"."tb_user"') == 1
    assert gate.endswith(
        'FROM (SELECT ((SELECT $1::bigint[]))[1] AS k) l0, LATERAL (SELECT (SELECT "fk_user" '
        'FROM "public"."tb_post" WHERE "pk_post" = l0.k) AS k OFFSET 0) l1, LATERAL (SELECT '
        '(SELECT "fk_company" FROM "public"."tb_user" WHERE "pk_user" = l1.k) AS k OFFSET 0) l2')
    # under REPEATABLE READ only: the parents read get their no-op UPDATE, after the locks, in
    # rank order; the post, rewritten, needs none
    touches = [gate.index(f"{TOUCH}('\"public\".\"tv_{t}\"'") for t in ("company", "user")]
    assert gate.count(TOUCH) == 2 and order[-1] < touches[0] < touches[1]
    assert "THEN \"tvproxy\".touch_row('\"public\".\"tv_user\"'::text::regclass, 'pk_user', " \
           "'bigint'::text::regtype, l1.k::bigint::text) END" in gate


def test_two_keys_of_one_rank_are_sorted_at_run_time() -> None:
    gate = _gate({"post": {7}, "user": {3}})  # write-txn: user 3 rewritten, post 7's author read
    assert "WITH" not in gate and gate.count("GROUP BY k ORDER BY h, x DESC") == 2  # ranks 0, 1
    # under REPEATABLE READ: a parent read that is also rewritten gets no no-op UPDATE
    assert gate.count(TOUCH) == 1 and "HAVING NOT bool_or(x) ORDER BY r, k" in gate


def test_general_gate_for_key_sets_and_old_catalogs() -> None:
    assert _gate({"post": {7, 8}}).startswith("WITH ")  # a set of keys
    untouchable = {e: dataclasses.replace(s, touch=None) for e, s in SPECS.items()}
    assert _gate({"post": {7}}, untouchable).startswith("WITH ")  # no touch function yet


def _placeholders(sql: str) -> set[int]:
    return {int(m) for m in re.findall(r"\$(\d+)", sql)}


def test_named_key_sets_are_read_by_one_index_scan() -> None:
    plan = plan_refresh(SPECS, ORDER, {"post": {7, 8, 9}}, TYPES, 100, fk_sources=FK)
    assert plan is not None
    gate, refresh = plan.statements[0], plan.statements[-1]
    arr = "ANY((SELECT $1::bigint[])::bigint[])"
    # the posts' authors in one scan of tb_post's pk; their companies from those rows
    assert f'FROM "public"."tb_post" WHERE "pk_post" = {arr}' in gate
    assert '"pk_user" IN (SELECT * FROM p0)' in gate
    # the view read by the array too; the keys counted by it (no key CTE, no lookup per key)
    assert refresh.startswith(f'WITH src AS MATERIALIZED (SELECT "pk_post", "id", "fk_user", '
                              f'"data" FROM "public"."v_post" WHERE "pk_post" = {arr})')
    assert "LATERAL" not in refresh and "unnest" not in refresh
    assert "SELECT cardinality((SELECT $1::bigint[])::bigint[]) AS keys" in refresh
    assert plan.params[-1] == ([7, 8, 9],)


def test_keys_derived_from_children_bind_only_their_own_parameters() -> None:
    """A post's keys computed from written comments (an aggregation): the gate reads them from
    the comments and binds the comments' keys alone."""
    derived = {"post": [("comment", 'SELECT "fk_post" FROM "public"."tb_comment" WHERE '
                                    '"pk_comment" IN ({keys})')]}
    touched = {"comment": {1, 2}}
    plan = plan_refresh(SPECS, ORDER, touched, {**TYPES, "comment": "bigint"}, 100,
                        derived=derived, fk_sources=FK)
    assert plan is not None
    for sql, params in zip(plan.statements, plan.params, strict=True):
        assert _placeholders(sql) <= set(range(1, len(params) + 1))
        assert all(p == [1, 2] for p in params)
