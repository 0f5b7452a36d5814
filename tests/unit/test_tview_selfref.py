"""Self-referencing TVIEWs, the pure parts: how a SELECT reads its own base table
(tview/selfref.py), the key mapping it gives, and the key-set SQL of the planner."""

from __future__ import annotations

import pytest

from tvproxy.tview.analyze import TviewError, key_mapping
from tvproxy.tview.catalog import CatalogEntry
from tvproxy.tview.model import BaseTable, build_runtime, old_parents
from tvproxy.tview.planner import ALL_KEYS, UNBOUNDED, TviewSpec, affected, plan_refresh
from tvproxy.tview.selfref import SelfReference, self_reference
from tvproxy.tview.treekeys import SelfRule, self_keys, walk_keys

COLUMNS = {"tb_node": ["pk_node", "id", "fk_node", "fk_owner", "name"],
           "tb_tag": ["pk_tag", "fk_node", "label"]}
VIEWS = {"v_base": "SELECT pk_node, fk_node, name FROM tb_node",
         "public.v_base": "SELECT pk_node, fk_node, name FROM tb_node"}
INF = UNBOUNDED


def ref(sql: str) -> SelfReference | None:
    return self_reference(sql, "tb_node", "pk_node", "pk_node", COLUMNS, VIEWS, "public")


@pytest.mark.parametrize("sql, terms", [
    # the parent a node embeds: a change reaches its children
    ("SELECT n.pk_node, jsonb_build_object('p', p.name) AS data FROM tb_node n"
     " LEFT JOIN tb_node p ON p.pk_node = n.fk_node", [(1, 0)]),
    # the same, written as an inner join in WHERE, and through a nested view
    ("SELECT n.pk_node, p.name AS data FROM tb_node n, tb_node p WHERE n.fk_node = p.pk_node",
     [(1, 0)]),
    ("SELECT n.pk_node, p.name AS data FROM tb_node n JOIN tb_node p ON p.pk_node = n.fk_node",
     [(1, 0)]),
    ("SELECT b.pk_node, jsonb_build_object('p', p.name) AS data FROM v_base b"
     " LEFT JOIN tb_node p ON p.pk_node = b.fk_node", [(1, 0)]),
    # grandparent: two levels down
    ("SELECT n.pk_node, jsonb_build_object('p', p.name, 'g', g.name) AS data FROM tb_node n"
     " LEFT JOIN tb_node p ON p.pk_node = n.fk_node LEFT JOIN tb_node g ON g.pk_node = p.fk_node",
     [(2, 0)]),
    # children aggregated: a change reaches the parent (old and new)
    ("SELECT n.pk_node, (SELECT count(*) FROM tb_node c WHERE c.fk_node = n.pk_node) AS data"
     " FROM tb_node n", [(0, 1)]),
    ("SELECT n.pk_node, (SELECT jsonb_agg(name) FROM tb_node WHERE fk_node = n.pk_node) AS data"
     " FROM tb_node n", [(0, 1)]),
    ("SELECT n.pk_node, '{}'::jsonb AS data FROM tb_node n"
     " WHERE n.pk_node IN (SELECT fk_node FROM tb_node)", [(0, 1)]),
    # both
    ("SELECT n.pk_node, jsonb_build_object('p', p.name, 'n', (SELECT count(*) FROM tb_node c"
     " WHERE c.fk_node = n.pk_node)) AS data FROM tb_node n"
     " LEFT JOIN tb_node p ON p.pk_node = n.fk_node", [(0, 1), (1, 0)]),
    # siblings: up one, then down one
    ("SELECT n.pk_node, (SELECT count(*) FROM tb_node s WHERE s.fk_node = n.fk_node) AS data"
     " FROM tb_node n", [(1, 1)]),
    ("SELECT n.pk_node, s.name AS data FROM tb_node n JOIN tb_node s USING (fk_node)", [(1, 1)]),
    # the same row twice: nothing to propagate
    ("SELECT n.pk_node, m.name AS data FROM tb_node n JOIN tb_node m ON m.pk_node = n.pk_node",
     []),
    # LATERAL, SELECT * of a subquery, windows and LIMIT over the children only
    ("SELECT n.pk_node, x.name AS data FROM tb_node n, LATERAL (SELECT p.name FROM tb_node p"
     " WHERE p.pk_node = n.fk_node) x", [(1, 0)]),
    ("SELECT s.pk_node, p.name AS data FROM (SELECT * FROM tb_node) s"
     " LEFT JOIN tb_node p ON p.pk_node = s.fk_node", [(1, 0)]),
    ("SELECT n.pk_node, (SELECT jsonb_agg(x.name) FROM (SELECT c.name, row_number() OVER"
     " (ORDER BY c.name) FROM tb_node c WHERE c.fk_node = n.pk_node) x) AS data FROM tb_node n",
     [(0, 1)]),
    ("SELECT n.pk_node, (SELECT c.name FROM tb_node c WHERE c.fk_node = n.pk_node"
     " ORDER BY c.name LIMIT 1) AS data FROM tb_node n", [(0, 1)]),
    ("SELECT n.pk_node, jsonb_agg(c.name) AS data FROM tb_node n LEFT JOIN tb_node c"
     " ON c.fk_node = n.pk_node GROUP BY n.pk_node", [(0, 1)]),
    ("SELECT n.pk_node, c.k AS data FROM tb_node n LEFT JOIN (SELECT fk_node, count(*) AS k"
     " FROM tb_node GROUP BY fk_node) c ON c.fk_node = n.pk_node", [(0, 1)]),
    ("SELECT n.pk_node, x.name AS data FROM tb_node n, LATERAL (SELECT c.name FROM tb_node c"
     " WHERE c.fk_node = n.pk_node ORDER BY c.name LIMIT 2) x", [(0, 1)]),
    # recursive: the ancestors (correlated, and as a CTE of the whole view), the subtree
    ("SELECT n.pk_node, (WITH RECURSIVE up(pk, fk, name) AS (SELECT a.pk_node, a.fk_node, a.name"
     " FROM tb_node a WHERE a.pk_node = n.pk_node UNION SELECT p.pk_node, p.fk_node, p.name"
     " FROM up JOIN tb_node p ON p.pk_node = up.fk) SELECT jsonb_agg(name) FROM up) AS data"
     " FROM tb_node n", [(INF, 0)]),
    ("WITH RECURSIVE anc(start, fk, name) AS (SELECT pk_node, fk_node, name FROM tb_node"
     " UNION ALL SELECT anc.start, p.fk_node, p.name FROM anc JOIN tb_node p"
     " ON p.pk_node = anc.fk) SELECT n.pk_node, (SELECT jsonb_agg(a.name) FROM anc a"
     " WHERE a.start = n.pk_node) AS data FROM tb_node n", [(INF, 0)]),
    ("WITH RECURSIVE sub(root, pk) AS (SELECT pk_node, pk_node FROM tb_node UNION"
     " SELECT sub.root, c.pk_node FROM sub JOIN tb_node c ON c.fk_node = sub.pk)"
     " SELECT n.pk_node, (SELECT count(*) FROM sub WHERE sub.root = n.pk_node) AS data"
     " FROM tb_node n", [(0, INF)]),
    # a CYCLE clause (the view's own guard against data cycles)
    ("SELECT n.pk_node, (WITH RECURSIVE up(pk, fk) AS (SELECT a.pk_node, a.fk_node FROM tb_node"
     " a WHERE a.pk_node = n.pk_node UNION ALL SELECT p.pk_node, p.fk_node FROM up JOIN tb_node p"
     " ON p.pk_node = up.fk) CYCLE pk SET is_cycle USING path SELECT count(*) FROM up"
     " WHERE NOT is_cycle) AS data FROM tb_node n", [(INF, 0)]),
    # rows made of rows: the TVIEW's rows are those of a recursive CTE (each from the previous
    # one, its parent), or children found through a LATERAL subquery
    ("WITH RECURSIVE t AS (SELECT pk_node, fk_node, 1 AS depth FROM tb_node WHERE fk_node IS"
     " NULL UNION ALL SELECT c.pk_node, c.fk_node, t.depth + 1 FROM tb_node c JOIN t"
     " ON c.fk_node = t.pk_node) SELECT t.pk_node, t.depth AS data FROM t", [(INF, 0)]),
    ("WITH RECURSIVE t AS (SELECT a.pk_node, b.name AS top, 1 AS depth FROM tb_node a JOIN"
     " tb_node b ON b.pk_node = a.fk_node WHERE b.fk_node IS NULL UNION ALL SELECT c.pk_node,"
     " t.top, t.depth + 1 FROM tb_node c JOIN t ON c.fk_node = t.pk_node)"
     " SELECT t.pk_node, t.top AS data FROM t", [(INF, 0)]),
    ("SELECT s.pk_node, s.pname AS data FROM tb_node n, LATERAL (SELECT c.pk_node, n.name AS"
     " pname FROM tb_node c WHERE c.fk_node = n.pk_node) s", [(1, 0)]),
])
def test_shapes(sql: str, terms: list[tuple[int, int]]) -> None:
    got = ref(sql)
    assert got is not None and got.problem is None, got
    assert list(got.terms) == terms
    assert got.link == ("fk_node" if terms else None)
    assert got.recursive == any(INF in t for t in terms)


@pytest.mark.parametrize("sql", [
    "SELECT n.pk_node, jsonb_build_object('n', n.name) AS data FROM tb_node n",
    "SELECT t.pk_tag AS pk_node, t.label AS data FROM tb_tag t",
])
def test_one_reference_is_not_self_referencing(sql: str) -> None:
    assert ref(sql) is None


@pytest.mark.parametrize("sql, words", [
    ("SELECT n.pk_node, p.name AS data FROM tb_node n LEFT JOIN tb_node p ON p.name = n.name",
     ["tb_node p", "p.name = n.name", "pk_node"]),
    ("SELECT n.pk_node, (SELECT count(*) FROM tb_node) AS data FROM tb_node n",
     ["no condition"]),
    ("SELECT n.pk_node, p.name AS data FROM tb_node n LEFT JOIN tb_node p"
     " ON p.pk_node = n.fk_node + 0", ["p.pk_node = n.fk_node + 0"]),
    # a condition in a join it does not constrain: p is every row
    ("SELECT n.pk_node, p.name AS data FROM tb_node n CROSS JOIN tb_node p"
     " LEFT JOIN tb_tag t ON p.pk_node = n.fk_node", ["tb_node p"]),
    # through a link table
    ("SELECT n.pk_node, p.name AS data FROM tb_node n JOIN tb_tag t ON t.fk_node = n.pk_node"
     " JOIN tb_node p ON p.pk_node = t.pk_tag", ["tb_node p"]),
    # two link columns
    ("SELECT n.pk_node, jsonb_build_object('p', p.name, 'o', o.name) AS data FROM tb_node n"
     " LEFT JOIN tb_node p ON p.pk_node = n.fk_node LEFT JOIN tb_node o"
     " ON o.pk_node = n.fk_owner", ["more than one column", "fk_node", "fk_owner"]),
    ("SELECT p.pk_node, p.name AS data FROM tb_node n NATURAL JOIN tb_node p", ["NATURAL"]),
    # one reference, but each row reads the rows beside it
    ("SELECT n.pk_node, row_number() OVER (PARTITION BY n.fk_node ORDER BY n.name) AS data"
     " FROM tb_node n", ["window function"]),
    ("SELECT s.pk_node, s.rn AS data FROM (SELECT pk_node, rank() OVER w AS rn FROM tb_node"
     " WINDOW w AS (ORDER BY name)) s", ["window function"]),
    ("SELECT DISTINCT ON (n.fk_node) n.pk_node, n.name AS data FROM tb_node n"
     " ORDER BY n.fk_node, n.name", ["DISTINCT ON"]),
    ("SELECT n.pk_node, n.name AS data FROM tb_node n ORDER BY n.name LIMIT 10",
     ["LIMIT"]),
    # rows chosen by the others before the join says which (LIMIT, a window, DISTINCT ON)
    ("SELECT n.pk_node, c.name AS data FROM tb_node n LEFT JOIN (SELECT fk_node, name FROM"
     " tb_node ORDER BY name LIMIT 5) c ON c.fk_node = n.pk_node",
     ["LIMIT/OFFSET before c.fk_node = n.pk_node"]),
    ("SELECT n.pk_node, '{}'::jsonb AS data FROM tb_node n WHERE n.pk_node IN"
     " (SELECT fk_node FROM tb_node ORDER BY name LIMIT 5)", ["LIMIT/OFFSET"]),
    ("SELECT n.pk_node, c.r AS data FROM tb_node n JOIN (SELECT fk_node, rank() OVER"
     " (ORDER BY name) AS r FROM tb_node) c ON c.fk_node = n.pk_node", ["window function"]),
    # a recursion through a computed value cannot be followed
    ("SELECT n.pk_node, (WITH RECURSIVE up(pk, fk) AS (SELECT a.pk_node, a.fk_node FROM tb_node"
     " a WHERE a.pk_node = n.pk_node UNION SELECT p.pk_node, COALESCE(p.fk_node, 0) FROM up"
     " JOIN tb_node p ON p.pk_node = up.fk) SELECT count(*) FROM up) AS data FROM tb_node n",
     ["p.pk_node = up.fk"]),
])
def test_shapes_that_cannot_be_mapped(sql: str, words: list[str]) -> None:
    got = ref(sql)
    assert got is not None and got.problem is not None and not got.terms
    for w in words:
        assert w in got.problem, got.problem


def test_key_mapping_of_a_tree_and_of_a_refused_shape() -> None:
    cols = ["pk_node", "id", "fk_node", "data"]
    tree = ref("SELECT n.pk_node, n.id, n.fk_node, p.name AS data FROM tb_node n"
               " LEFT JOIN tb_node p ON p.pk_node = n.fk_node")
    m = key_mapping("node", cols, {"tb_node": COLUMNS["tb_node"]}, {}, tree)
    assert m.strategy == "incremental" and not m.warnings
    assert [r.rule for r in m.rules] == ["self"]
    assert m.tree == {"link": "fk_node", "terms": [[1, 0]]}
    bad = ref("SELECT n.pk_node, n.id, p.name AS data FROM tb_node n"
              " LEFT JOIN tb_node p ON p.name = n.name")
    m = key_mapping("node", cols, {"tb_node": COLUMNS["tb_node"]}, {}, bad)
    assert m.strategy == "full" and m.rules == () and m.tree is None
    assert "tv_node (view v_node)" in m.warnings[0] and "p.name = n.name" in m.warnings[0]
    assert "refreshed fully when tb_node changes" in m.warnings[0]


# --------------------------------------------------------------------------------------------
# Runtime and key sets

def _spec(terms: tuple[tuple[int, int], ...], parents: str | None = None) -> TviewSpec:
    rule = SelfRule("public", "tb_node", "pk_node", "fk_node", terms, '"tvproxy"."raise_error"',
                    parents)
    return TviewSpec("node", "tv_node", "v_node", "pk_node", "bigint",
                     ("pk_node", "id", "fk_node", "data"), (), "public", rule)


TYPES = {"node": "bigint", old_parents("node"): "bigint"}


def test_walks() -> None:
    spec = _spec(((1, 0),))
    down = walk_keys(spec, "SELECT unnest($1::bigint[])", 1, True)
    assert "WITH RECURSIVE w(k, n)" in down and " UNION SELECT tn.\"pk_node\"::bigint" in down
    assert 'tn."fk_node" = w.k AND w.n < 1' in down and "raise_error" not in down
    up = walk_keys(spec, "SELECT 1", 5, False, guard_depth=5)
    assert 'tn."pk_node" = w.k AND w.n <= 5 WHERE tn."fk_node" IS NOT NULL' in up
    assert "min(n)" in up and "WHEN d.n > 5 THEN \"tvproxy\".\"raise_error\"('54001'" in up
    both = self_keys(_spec(((0, 1), (1, 0))), "SELECT unnest($1::bigint[])",
                     "SELECT unnest($2::bigint[])", 100)
    # K walked up one and down one; the old parents are one level up already: themselves
    assert both.startswith("SELECT z.k FROM (WITH sk(k) AS MATERIALIZED (SELECT unnest($1")
    assert "so(k) AS MATERIALIZED (SELECT unnest($2" in both and both.count("WITH RECURSIVE") == 2
    assert both.endswith("UNION SELECT k FROM so) z(k)")


def test_plans_bind_keys_and_grow_them() -> None:
    spec = _spec(((INF, 0),))
    plan = plan_refresh({"node": spec}, ["node"], {"node": {3, 1}}, TYPES, 7, 4)
    assert plan is not None and plan.entities == ("node",)
    # gate (shared locks on the ancestors read), expand (the descendants), refresh
    assert len(plan.statements) == 3 and plan.first_refresh == 2
    gate, expand, refresh = plan.statements
    assert "pg_advisory_xact_lock_shared" in gate and "w.n < 4" in gate
    assert "w.n <= 4" in expand and "'54001'" in expand and "'54001'" in refresh
    assert plan.params == (([1, 3],), ([1, 3],), ([1, 3],))
    # aggregation: no shared locks; the old parents are bound with their own parameter
    spec = _spec(((0, 1),), old_parents("node"))
    plan = plan_refresh({"node": spec}, ["node"], {"node": {6}, old_parents("node"): {3}},
                        TYPES, 7)
    assert plan is not None and len(plan.statements) == 2  # no gate needed, expand, refresh
    assert plan.params[-1] == ([6], [3])
    # every key: no walk at all
    every = {"node": 'SELECT pk_node FROM "public"."v_node"'}
    plan = plan_refresh({"node": spec}, ["node"], {"node": {ALL_KEYS}}, TYPES, 7,
                        all_keys=every)
    assert plan is not None and "WITH RECURSIVE" not in plan.statements[-1]
    # old parents unknown (RETURNING before PostgreSQL 18): every row too
    plan = plan_refresh({"node": spec}, ["node"], {"node": {6}, old_parents("node"): {ALL_KEYS}},
                        TYPES, 7, all_keys=every)
    assert plan is not None and "WITH RECURSIVE" not in plan.statements[-1]
    assert 'FROM (SELECT pk_node FROM "public"."v_node" UNION' in plan.statements[-1]


def test_bounded_terms_beyond_max_depth_raise_54001() -> None:
    spec = _spec(((3, 0),))
    assert affected({"node": spec}, {"node"}, 3) == {"node": 0}
    with pytest.raises(TviewError) as err:
        affected({"node": spec}, {"node"}, 2)
    assert err.value.sqlstate == "54001" and "tv_node" in err.value.message


def test_build_runtime_registers_old_parents() -> None:
    entry = CatalogEntry(
        "node", "tv_node", "v_node", "pk_node", "bigint", "SELECT ...", ("public.tb_node",), (),
        {"schema": "public", "columns": ["pk_node", "id", "fk_node", "data"],
         "rules": [{"table": "tb_node", "entity": "node", "rule": "self", "column": None,
                    "via": None}], "unmapped": [],
         "tree": {"link": "fk_node", "terms": [[0, 1], [1, 0]], "guard": '"tv"."raise_error"'}})
    table = BaseTable("tb_node", "public", "pk_node", "bigint",
                      ("pk_node", "id", "fk_node", "name"))
    cat = build_runtime([entry], {"tb_node": table})
    tree = cat.specs["node"].tree
    assert tree == SelfRule("public", "tb_node", "pk_node", "fk_node", ((0, 1), (1, 0)),
                            '"tv"."raise_error"', old_parents("node"))
    assert cat.aggregated_into["node"] == [old_parents("node")]
    assert cat.aggregations["node"] == ((old_parents("node"), "fk_node"),)
    assert cat.preimage["node"][0][0] == old_parents("node")
    assert cat.key_types[old_parents("node")] == "bigint"
    # only down: no old parents needed
    entry.key_mapping["tree"]["terms"] = [[1, 0]]
    cat = build_runtime([entry], {"tb_node": table})
    assert cat.specs["node"].tree is not None and cat.specs["node"].tree.parents is None
    assert "node" not in cat.preimage
