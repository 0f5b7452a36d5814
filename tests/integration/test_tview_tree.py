"""Self-referencing TVIEWs through the proxy: a tree ``tb_node`` (``fk_node`` names the parent)
and views that read other rows of it: the parent a node embeds, the children it aggregates, its
ancestor path (``WITH RECURSIVE``).  Renames, re-parenting, deletes (SET NULL and CASCADE
children), data cycles, the depth bound (54001) and the shape that cannot be mapped (strategy
full, with a WARNING).  After every COMMIT the oracle holds (tv_node equals v_node, EXCEPT ALL
both ways), and where it says something about cost, the rows refreshed are the expected ones
(stamped beforehand straight on the server, :class:`tview_fixture.FixtureF`).

The tree:    1 root ─┬─ 2 a ─┬─ 4 a1
                     │       └─ 5 a2 ── 7 a2x
                     └─ 3 b ─── 6 b1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import tview_fixture
from tview_fixture import FixtureF, drift_rows, rollback_prepared

tview_proxy = tview_fixture.tview_proxy

PARENT = """SELECT n.pk_node, n.id, n.fk_node,
       jsonb_build_object('name', n.name, 'parent', p.name) AS data
  FROM tb_node n LEFT JOIN tb_node p ON p.pk_node = n.fk_node"""

CHILDREN = """SELECT n.pk_node, n.id, n.fk_node,
       jsonb_build_object('name', n.name,
         'children', (SELECT count(*) FROM tb_node c WHERE c.fk_node = n.pk_node),
         'names', COALESCE((SELECT jsonb_agg(c.name ORDER BY c.pk_node) FROM tb_node c
                            WHERE c.fk_node = n.pk_node), '[]'::jsonb)) AS data
  FROM tb_node n"""

# the ancestor path; the view itself stops at a data cycle (a row met again)
PATH = """SELECT n.pk_node, n.id, n.fk_node,
       jsonb_build_object('name', n.name, 'path', (
         WITH RECURSIVE up(pk, fk, name, depth, seen) AS (
           SELECT a.pk_node, a.fk_node, a.name, 0, ARRAY[a.pk_node]
             FROM tb_node a WHERE a.pk_node = n.pk_node
           UNION ALL
           SELECT p.pk_node, p.fk_node, p.name, up.depth + 1, up.seen || p.pk_node
             FROM up JOIN tb_node p ON p.pk_node = up.fk WHERE p.pk_node <> ALL (up.seen))
         SELECT jsonb_agg(name ORDER BY depth DESC) FROM up)) AS data
  FROM tb_node n"""

# the depth of each node under a root: the TVIEW's rows are those of a recursive CTE
DEPTH = """WITH RECURSIVE t AS (
    SELECT pk_node, id, fk_node, name, 0 AS depth FROM tb_node WHERE fk_node IS NULL
    UNION ALL
    SELECT c.pk_node, c.id, c.fk_node, c.name, t.depth + 1
      FROM tb_node c JOIN t ON c.fk_node = t.pk_node)
SELECT t.pk_node, t.id, t.fk_node, jsonb_build_object('name', t.name, 'depth', t.depth) AS data
  FROM t"""

# twins by name: a self-join that is not pk = fk
TWINS = """SELECT n.pk_node, n.id,
       jsonb_build_object('name', n.name, 'twins', (SELECT count(*) FROM tb_node t
                          WHERE t.name = n.name AND t.pk_node <> n.pk_node)) AS data
  FROM tb_node n"""

# a node's rank among its siblings: one reference, but it reads the rows beside it
RANK = """SELECT n.pk_node, n.id,
       jsonb_build_object('name', n.name,
                          'rank', rank() OVER (PARTITION BY n.fk_node ORDER BY n.name)) AS data
  FROM tb_node n"""

ROWS = [(1, None, "root"), (2, 1, "a"), (3, 1, "b"), (4, 2, "a1"), (5, 2, "a2"), (6, 3, "b1"),
        (7, 5, "a2x")]


def _tables(on_delete: str) -> str:
    rows = ", ".join(f"({pk}, {'NULL' if fk is None else fk}, '{name}')" for pk, fk, name in ROWS)
    action = f" ON DELETE {on_delete}" if on_delete else ""
    return f"""
DROP SCHEMA IF EXISTS tvproxy CASCADE;
DROP TABLE IF EXISTS tv_node CASCADE;
DROP VIEW IF EXISTS v_node CASCADE;
DROP TABLE IF EXISTS tb_node CASCADE;
CREATE TABLE tb_node (pk_node BIGINT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(),
  fk_node BIGINT REFERENCES tb_node{action}, name TEXT NOT NULL);
CREATE INDEX ON tb_node (fk_node);
INSERT INTO tb_node (pk_node, fk_node, name) VALUES {rows};
"""


class Tree(FixtureF):
    """The tree on one server behind the module's proxy (FixtureF's oracle and stamps)."""

    def make(self, select: str, on_delete: str | None = "", proxy: Any = None) -> list[str]:
        """tb_node straight on the server (None: as it is), tv_node through the proxy; the
        WARNINGs of the CREATE."""
        if on_delete is not None:
            self.conn.execute(_tables(on_delete))
        notices: list[str] = []
        with psycopg.connect((proxy or self.proxy).dsn("app"), autocommit=True) as c:
            c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            c.execute(f"CREATE TABLE tv_node AS {select}")
        self.check()
        return notices

    def check(self) -> None:
        bad = {e: r for e, r in drift_rows(self.conn).items() if r}
        assert not bad, f"oracle: tv_node differs from v_node: {bad}"

    def data(self, pk: int) -> Any:
        return self.one("SELECT data FROM tv_node WHERE pk_node = %s", pk)

    def refreshed(self) -> set[Any]:
        return self.unstamp().get("node", set())


@pytest.fixture
def tree(tview_pg: Any, tview_proxy: Any) -> Iterator[Tree]:
    if not tview_proxy.running:
        tview_proxy.start()
    fx = Tree(tview_pg, tview_proxy)
    try:
        yield fx
    finally:
        rollback_prepared(tview_pg)  # they would hold their locks
        fx.conn.execute("DROP TABLE IF EXISTS tv_node CASCADE; DROP VIEW IF EXISTS v_node;"
                        " DROP TABLE IF EXISTS tb_node CASCADE;"
                        " DROP SCHEMA IF EXISTS tvproxy CASCADE")
        fx.close()


def _connect(tree: Tree, mode: str, proxy: Any = None) -> psycopg.Connection:
    """``simple``: client-side binding (every statement a simple Query); ``extended``: bound
    parameters (Parse/Bind/Execute)."""
    dsn = (proxy or tree.proxy).dsn("app")
    if mode == "simple":
        return psycopg.connect(dsn, cursor_factory=psycopg.ClientCursor)
    return psycopg.connect(dsn)


def _step(tree: Tree, c: psycopg.Connection, *writes: tuple[str, tuple[Any, ...]]) -> set[Any]:
    """Run ``writes`` in one transaction; the oracle after its COMMIT; the keys refreshed."""
    tree.stamp()
    for sql, params in writes:
        c.execute(sql, params or None)
    c.commit()
    got = tree.refreshed()
    tree.check()
    return got


def test_shapes_are_detected_at_create(tree: Tree) -> None:
    tree.make(PARENT)
    mapping = tree.one("SELECT key_mapping FROM tvproxy.tview WHERE entity = 'node'")
    assert mapping["tree"]["link"] == "fk_node" and mapping["tree"]["terms"] == [[1, 0]]
    assert tree.one("SELECT strategy FROM tvproxy.tview") == "incremental"
    tree.make(PATH)
    mapping = tree.one("SELECT key_mapping FROM tvproxy.tview WHERE entity = 'node'")
    assert mapping["tree"]["terms"] == [[-1, 0]]
    tree.make(CHILDREN)
    mapping = tree.one("SELECT key_mapping FROM tvproxy.tview WHERE entity = 'node'")
    assert mapping["tree"]["terms"] == [[0, 1]]


def test_through_a_nested_view(tree: Tree) -> None:
    tree.conn.execute(_tables(""))
    tree.conn.execute("CREATE VIEW v_named AS SELECT pk_node, id, fk_node, upper(name) AS label"
                      " FROM tb_node")
    try:
        tree.make("SELECT n.pk_node, n.id, n.fk_node, jsonb_build_object('label', n.label,"
                  " 'parent', p.label) AS data FROM v_named n LEFT JOIN v_named p"
                  " ON p.pk_node = n.fk_node", None)
        mapping = tree.one("SELECT key_mapping FROM tvproxy.tview WHERE entity = 'node'")
        assert mapping["tree"]["terms"] == [[1, 0]]
        with _connect(tree, "extended") as c:
            got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("z", 3)))
            assert got == {3, 6} and tree.data(6)["parent"] == "Z"
    finally:
        tree.conn.execute("DROP TABLE IF EXISTS tv_node; DROP VIEW IF EXISTS v_node, v_named")


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_parent_rename_refreshes_its_children(tree: Tree, mode: str) -> None:
    tree.make(PARENT)
    with _connect(tree, mode) as c:
        got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("A", 2)))
        assert got == {2, 4, 5}  # the row and the rows embedding it, nothing else
        assert tree.data(4) == {"name": "a1", "parent": "A"}
        # re-parenting: the node moves, and is refreshed (its children embed only its name)
        got = _step(tree, c, ("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (3, 5)))
        assert got == {5, 7}
        assert tree.data(5) == {"name": "a2", "parent": "b"}
        # several writes in one transaction, an insert under a renamed parent among them
        got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("B", 3)),
                    ("INSERT INTO tb_node (pk_node, fk_node, name) VALUES (8, 3, 'b2')", ()),
                    ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("ROOT", 1)))
        assert got == {1, 2, 3, 5, 6, 8}
        assert tree.data(8) == {"name": "b2", "parent": "B"}
        _step(tree, c, ("DELETE FROM tb_node WHERE pk_node = %s", (7,)))


@pytest.mark.parametrize("on_delete", ["SET NULL", "CASCADE"])
def test_parent_delete_with_set_null_or_cascade_children(tree: Tree, on_delete: str) -> None:
    tree.make(PARENT, on_delete)
    with _connect(tree, "extended") as c:
        _step(tree, c, ("DELETE FROM tb_node WHERE pk_node = %s", (2,)))
        left = tree.one("SELECT array_agg(pk_node ORDER BY pk_node) FROM tv_node")
        assert left == ([1, 3, 4, 5, 6, 7] if on_delete == "SET NULL" else [1, 3, 6])
        if on_delete == "SET NULL":
            assert tree.data(4) == {"name": "a1", "parent": None}
        _step(tree, c, ("UPDATE tb_node SET name = 'R' WHERE pk_node = 1", ()),
              ("DELETE FROM tb_node WHERE pk_node = 3", ()))


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_ancestor_path_follows_renames_and_moves(tree: Tree, mode: str) -> None:
    tree.make(PATH)
    assert tree.data(7)["path"] == ["root", "a", "a2", "a2x"]
    with _connect(tree, mode) as c:
        got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("ROOT", 1)))
        assert got == {1, 2, 3, 4, 5, 6, 7}  # every descendant
        assert tree.data(7)["path"] == ["ROOT", "a", "a2", "a2x"]
        got = _step(tree, c, ("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (6, 5)))
        assert got == {5, 7}
        assert tree.data(7)["path"] == ["ROOT", "b", "b1", "a2", "a2x"]
        got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("B", 3)),
                    ("INSERT INTO tb_node (pk_node, fk_node, name) VALUES (8, 7, 'deep')", ()))
        assert got == {3, 6, 5, 7, 8}
        assert tree.data(8)["path"] == ["ROOT", "B", "b1", "a2", "a2x", "deep"]
        c.execute("UPDATE tb_node SET name = 'x' WHERE name LIKE 'a%%'")  # keys from RETURNING
        c.commit()
        tree.check()


def test_rows_of_a_recursive_cte_follow_moves(tree: Tree) -> None:
    tree.make(DEPTH)
    assert tree.data(7)["depth"] == 3
    with _connect(tree, "extended") as c:
        got = _step(tree, c, ("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (6, 5)))
        assert got == {5, 7} and tree.data(7)["depth"] == 4
        got = _step(tree, c, ("UPDATE tb_node SET fk_node = NULL WHERE pk_node = %s", (3,)))
        assert got == {3, 5, 6, 7} and tree.data(7)["depth"] == 3
        # a data cycle: 3 under 7 (its own descendant); the view loses them, and so does tv_
        _step(tree, c, ("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (7, 3)))
        assert tree.one("SELECT count(*) FROM tv_node") == 3


async def test_ancestor_path_with_asyncpg(tree: Tree) -> None:
    tree.make(PATH)
    c = await asyncpg.connect(tree.proxy.url("app"))
    try:
        await c.execute("UPDATE tb_node SET name = $1 WHERE pk_node = $2", "A", 2)
        tree.check()
        async with c.transaction():
            await c.execute("UPDATE tb_node SET fk_node = $1 WHERE pk_node = $2", 4, 5)
            await c.execute("INSERT INTO tb_node (pk_node, fk_node, name) VALUES ($1, $2, $3)",
                            8, 7, "z")
        tree.check()
        assert tree.data(8)["path"] == ["root", "A", "a1", "a2", "a2x", "z"]
    finally:
        await c.close()


def test_depth_beyond_max_propagation_depth_fails_the_commit(
        tree: Tree, tview_proxy_factory: Any) -> None:
    shallow = tview_proxy_factory(tview={"max_propagation_depth": 2})
    tree.make(PATH, proxy=shallow)
    for mode in ("simple", "extended"):
        with _connect(tree, mode, shallow) as c:
            c.execute("UPDATE tb_node SET name = 'ROOT' WHERE pk_node = 1")  # 7 is 3 below
            with pytest.raises(psycopg.errors.StatementTooComplex) as err:
                c.commit()
            assert "max_propagation_depth (2)" in str(err.value)
        assert tree.one("SELECT name FROM tb_node WHERE pk_node = 1") == "root"  # rolled back
        tree.check()
    with psycopg.connect(shallow.dsn("app"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.StatementTooComplex):
            c.execute("UPDATE tb_node SET name = 'ROOT' WHERE pk_node = 1")
        c.execute("UPDATE tb_node SET name = 'A' WHERE pk_node = 2")  # 2 levels below: fine
    tree.check()
    assert tree.data(7)["path"] == ["root", "A", "a2", "a2x"]


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_children_aggregation_refreshes_old_and_new_parents(tree: Tree, mode: str) -> None:
    tree.make(CHILDREN)
    with _connect(tree, mode) as c:
        got = _step(tree, c, ("INSERT INTO tb_node (pk_node, fk_node, name) VALUES (%s, %s, %s)",
                              (8, 3, "b2")))
        assert got == {8, 3}
        assert tree.data(3)["names"] == ["b1", "b2"]
        got = _step(tree, c, ("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (2, 6)))
        assert got == {6, 3, 2}  # the row, its old parent and its new one
        assert tree.data(2)["children"] == 3 and tree.data(3)["names"] == ["b2"]
        got = _step(tree, c, ("DELETE FROM tb_node WHERE pk_node = %s", (4,)))
        assert got == {4, 2}
        got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("A2", 5)))
        assert got == {5, 2}
        # keys the statement does not name: RETURNING (and old parents: pre-image or old.*)
        _step(tree, c, ("UPDATE tb_node SET fk_node = 1 WHERE name LIKE %s", ("b%",)))
        assert tree.data(1)["names"] == ["a", "b", "b1", "b2"]
        _step(tree, c, ("DELETE FROM tb_node WHERE name = %s", ("b2",)))
        assert tree.data(1)["names"] == ["a", "b", "b1"]


@pytest.mark.parametrize("select", [PARENT, PATH, CHILDREN], ids=["parent", "path", "children"])
def test_data_cycles_terminate(tree: Tree, tview_proxy_factory: Any, select: str) -> None:
    shallow = tview_proxy_factory(tview={"max_propagation_depth": 3})
    tree.make(select, proxy=shallow)
    with _connect(tree, "extended", shallow) as c:
        # 2 and 3 become each other's parent: the walk meets them again and stops
        _step(tree, c, ("UPDATE tb_node SET fk_node = CASE pk_node WHEN 2 THEN 3 ELSE 2 END"
                        " WHERE pk_node IN (2, 3)", ()))
        _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("A", 2)))
        _step(tree, c, ("UPDATE tb_node SET fk_node = pk_node WHERE pk_node = %s", (4,)))  # loop
        _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("A1", 4)),
              ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("B", 3)))
        _step(tree, c, ("UPDATE tb_node SET fk_node = 1 WHERE pk_node IN (2, 3, 4)", ()))
    if select == PATH:
        assert tree.data(7)["path"] == ["root", "A", "a2", "a2x"]


@pytest.mark.parametrize("select, why", [(TWINS, "t.name = n.name"), (RANK, "window function")],
                         ids=["name-join", "window"])
def test_shapes_that_cannot_be_mapped_are_refreshed_fully(tree: Tree, select: str,
                                                          why: str) -> None:
    notices = tree.make(select)
    assert any("tv_node" in n and "v_node" in n and why in n
               and "refreshed fully" in n for n in notices), notices
    assert tree.one("SELECT strategy FROM tvproxy.tview WHERE entity = 'node'") == "full"
    with _connect(tree, "extended") as c:
        _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("a1", 6)))
        _step(tree, c, ("INSERT INTO tb_node (pk_node, fk_node, name) VALUES (8, 2, '0')", ()))
        _step(tree, c, ("DELETE FROM tb_node WHERE pk_node = %s", (6,)))
        _step(tree, c, ("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (3, 4)))


@pytest.mark.parametrize("select", [PARENT, PATH], ids=["parent", "path"])
def test_children_under_one_parent_pass_a_rename_of_it_waits(tree: Tree, select: str) -> None:
    tree.make(select)
    held = psycopg.connect(tree.proxy.dsn("app"))
    try:
        held.execute("SET LOCAL lock_timeout = '5s'")
        held.execute("INSERT INTO tb_node (pk_node, fk_node, name) VALUES (8, 3, 'b2')")
        held.execute("PREPARE TRANSACTION 'tree_held'")  # holds its locks until COMMIT PREPARED
        with psycopg.connect(tree.proxy.dsn("app")) as c:  # a sibling: no wait
            c.execute("SET LOCAL lock_timeout = '5s'")
            c.execute("INSERT INTO tb_node (pk_node, fk_node, name) VALUES (9, 3, 'b3')")
        # a rename of the parent rewrites the prepared child too: it waits, and the client's
        # lock_timeout says how long
        with psycopg.connect(tree.proxy.dsn("app")) as c, pytest.raises(
                psycopg.errors.LockNotAvailable):
            c.execute("SET LOCAL lock_timeout = '300ms'")
            c.execute("UPDATE tb_node SET name = 'B' WHERE pk_node = 1" if select == PATH
                      else "UPDATE tb_node SET name = 'B' WHERE pk_node = 3")
            c.commit()
        tree.check()
        with psycopg.connect(tree.proxy.dsn("app"), autocommit=True) as c:
            c.execute("COMMIT PREPARED 'tree_held'")
        tree.check()
        with psycopg.connect(tree.proxy.dsn("app")) as c:
            c.execute("SET LOCAL lock_timeout = '5s'")
            c.execute("UPDATE tb_node SET name = 'B' WHERE pk_node = 3")
    finally:
        held.close()
    tree.check()
    assert tree.data(8)["path" if select == PATH else "parent"] == (
        ["root", "B", "b2"] if select == PATH else "B")


def test_two_phase_commit_of_a_move_refreshes_old_and_new_parents(tree: Tree) -> None:
    tree.make(CHILDREN)
    with psycopg.connect(tree.proxy.dsn("app")) as c:
        c.execute("UPDATE tb_node SET fk_node = %s WHERE pk_node = %s", (2, 6))
        c.execute("DELETE FROM tb_node WHERE pk_node = %s", (7,))
        c.execute("PREPARE TRANSACTION 'tree_move'")
    with psycopg.connect(tree.proxy.dsn("app"), autocommit=True) as c:
        c.execute("COMMIT PREPARED 'tree_move'")
    tree.check()
    assert tree.data(2)["names"] == ["a1", "a2", "b1"] and tree.data(3)["children"] == 0
    assert tree.data(5)["children"] == 0


def test_a_tree_created_before_the_analysis_is_refreshed_fully(tree: Tree) -> None:
    """A catalog row written by a tvproxy that did not analyse self-references (no ``tree``,
    no ``self_checked``): the proxy refreshes that TVIEW fully when its table changes."""
    tree.make(PARENT)
    tree.conn.execute("UPDATE tvproxy.tview SET key_mapping = key_mapping - 'tree'"
                      " - 'self_checked' WHERE entity = 'node'")
    tree.proxy.stop()
    tree.proxy.start()  # loads the catalog as it is now
    with _connect(tree, "extended") as c:
        got = _step(tree, c, ("UPDATE tb_node SET name = %s WHERE pk_node = %s", ("A", 2)))
    assert {2, 4, 5} <= got  # every row is recomputed; the ones embedding the parent too
    assert tree.data(4) == {"name": "a1", "parent": "A"}
    assert "created before that was analysed" in tree.proxy.logs()
