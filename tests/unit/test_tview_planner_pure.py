"""The refresh planner's statements, without a database: which gate a plan shape gets."""

from __future__ import annotations

import dataclasses

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
