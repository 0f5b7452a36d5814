"""Capture of touched keys from DML text (pure; fixture F's tables)."""

from __future__ import annotations

import pytest

from tvproxy.tview.capture import KeyRef, TrackedTable, capture, may_write

POST = TrackedTable("tb_post", "post", "pk_post", frozenset({"pk_post", "fk_user"}))
USER = TrackedTable("tb_user", "user", "pk_user", frozenset({"pk_user", "fk_company"}))
TABLES = (POST, USER)


def one(sql: str):  # noqa: ANN201 - test helper
    got = capture(sql, TABLES)
    assert len(got) == 1, got
    return got[0]


def test_untracked_traffic_is_not_parsed() -> None:
    names = frozenset({"tb_post", "tb_user"})
    assert not may_write("SELECT * FROM tb_post", frozenset({"tb_comment"}))
    assert not may_write("VACUUM tb_post", names)
    assert not may_write("update tb_other set x = 1", names)
    assert may_write("/* c */ UPDATE TB_POST SET title = 'x'", names)
    assert capture("SELECT 1", TABLES) == ()


@pytest.mark.parametrize(("sql", "keys"), [
    ("UPDATE tb_post SET title = 'P1b' WHERE pk_post = 1", (KeyRef(value=1),)),
    ("update tb_post p set title = $2 where p.pk_post = $1 and title <> ''", (KeyRef(param=1),)),
    ("DELETE FROM tb_post WHERE pk_post IN (1, 2, $3)",
     (KeyRef(value=1), KeyRef(value=2), KeyRef(param=3))),
    ("DELETE FROM tb_post WHERE pk_post = ANY($1)", (KeyRef(param=1, array=True),)),
    ("UPDATE tb_post SET title = title || '!'", None),
    ("UPDATE tb_post SET title = 'x' WHERE pk_post > 1", None),
    ("UPDATE tb_post SET title = 'x' WHERE pk_post = 1 OR pk_post = 2", None),
    ("DELETE FROM tb_post USING tb_user WHERE tb_post.fk_user = tb_user.pk_user", None),
    ("UPDATE tb_post SET title = 'x' WHERE 9999999999999 = pk_post", (KeyRef(value=9999999999999),)),
])
def test_keys_from_where(sql: str, keys: tuple[KeyRef, ...] | None) -> None:
    assert one(sql).keys == keys


def test_insert_values_and_select() -> None:
    w = one("INSERT INTO tb_post VALUES (4, DEFAULT, 3, 'P4')")
    assert w.op == "insert" and w.keys is None  # no column list: RETURNING decides
    w = one("insert into tb_post (pk_post, fk_user, title) values (4, 3, $1), ($2, 2, 'x')")
    assert w.keys == (KeyRef(value=4), KeyRef(param=2))
    assert one("INSERT INTO tb_post (fk_user, title) SELECT 1, 'x'").keys is None
    w = one("INSERT INTO tb_post (pk_post, fk_user, title) VALUES (1, 1, 'a') "
            "ON CONFLICT (pk_post) DO UPDATE SET fk_user = excluded.fk_user")
    assert w.keys == (KeyRef(value=1),) and w.assigns_key_columns and not w.assigns_pk
    w = one("INSERT INTO tb_post (pk_post, fk_user, title) VALUES (1, 1, 'a') "
            "ON CONFLICT (pk_post) DO UPDATE SET pk_post = 7")
    assert w.assigns_pk  # the new pk is not in the statement


def test_key_column_changes_and_returning() -> None:
    assert one("UPDATE tb_post SET fk_user = 3 WHERE pk_post = 1").assigns_key_columns
    assert not one("UPDATE tb_post SET title = 'x' WHERE pk_post = 1").assigns_key_columns
    assert one("DELETE FROM tb_post WHERE pk_post = 1 RETURNING *").has_returning


def test_writable_ctes_merge_and_schemas() -> None:
    got = capture("WITH d AS (DELETE FROM tb_post WHERE pk_post = 3 RETURNING fk_user) "
                  "UPDATE tb_user SET name = 'x' WHERE pk_user IN (SELECT fk_user FROM d)", TABLES)
    assert [(w.entity, w.op, w.keys) for w in got] == [
        ("post", "delete", (KeyRef(value=3),)), ("user", "update", None)]
    w = one("MERGE INTO tb_post t USING (VALUES (1)) s(k) ON t.pk_post = s.k "
            "WHEN MATCHED THEN UPDATE SET title = 'm'")
    assert w.op == "merge" and w.keys is None
    assert capture("UPDATE other.tb_post SET title = 'x'", TABLES) == ()
    got = capture("UPDATE tb_post SET title = 'a' WHERE pk_post = 1; "
                  "DELETE FROM tb_user WHERE pk_user = 2", TABLES)
    assert [(w.entity, w.keys) for w in got] == [("post", (KeyRef(value=1),)),
                                                 ("user", (KeyRef(value=2),))]


def test_copy_from_and_truncate_are_writes_with_unknown_keys() -> None:
    got = capture("COPY tb_post FROM STDIN", TABLES)
    assert [(w.table, w.op, w.keys) for w in got] == [("tb_post", "copy", None)]
    got = capture("TRUNCATE tb_post, tb_user CASCADE", TABLES)
    assert [(w.table, w.op) for w in got] == [("tb_post", "truncate"), ("tb_user", "truncate")]
    assert capture("COPY tb_post TO STDOUT", TABLES) == ()


def test_insert_without_column_list_uses_the_pk_position() -> None:
    post = TrackedTable("tb_post", "post", "pk_post", frozenset({"pk_post", "fk_user"}),
                        pk_position=0)
    (w,) = capture("INSERT INTO tb_post VALUES (4, DEFAULT, 3, 'P4'), ($1, DEFAULT, 1, 'x')",
                   (post,))
    assert w.keys == (KeyRef(value=4), KeyRef(param=1))
    (w,) = capture("INSERT INTO tb_post VALUES (DEFAULT, 1)", (post,))
    assert w.keys is None  # a default pk: unknown
    (w,) = capture("INSERT INTO tb_post VALUES (1)", (POST,))
    assert w.keys is None  # position unknown
