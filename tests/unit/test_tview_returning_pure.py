"""Appended RETURNING: the statement rewrite (tview/returning.py) and the stripping of replies
(protocol/strip.py), pure."""

from __future__ import annotations

from struct import pack

import pglast
import pytest

from tvproxy.protocol import ProtocolError
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D
from tvproxy.protocol.strip import (
    extend_result_formats,
    message_length,
    split_data_row,
    strip_row_description,
)
from tvproxy.tview.capture import TrackedTable
from tvproxy.tview.returning import KeyColumn, key_value, rewrite_returning

POST = TrackedTable("tb_post", "post", "pk_post", frozenset({"pk_post", "fk_user"}))
COMMENT = TrackedTable("tb_comment", "comment", "pk_comment",
                       frozenset({"pk_comment", "fk_post"}))
AGG = (("post", "fk_post"),)


def targets(sql: str) -> list[str]:
    """The RETURNING list of ``sql`` as pglast prints each target."""
    from pglast.stream import RawStream

    stmt = pglast.parse_sql(sql)[0].stmt
    clause = stmt.returningClause
    return [RawStream()(t) for t in clause.exprs] if clause is not None else []


@pytest.mark.parametrize("old_values", [False, True])
def test_update_without_keys_returns_its_pk(old_values: bool) -> None:
    rw = rewrite_returning("UPDATE tb_post SET title = title || '!' WHERE title LIKE 'P%'",
                           POST, (), old_values)
    assert rw is not None
    assert rw.op == "update" and rw.entity == "post" and not rw.client_columns
    assert rw.columns == (KeyColumn("post", "pk_post"),) and rw.n_extra == 1
    assert rw.all_keys == ()
    assert targets(rw.sql) == ["CAST(tb_post.pk_post AS pg_catalog.text)"]
    assert rw.sql.startswith("UPDATE tb_post SET title = title || '!' WHERE title LIKE 'P%'")


def test_client_returning_comes_first_and_alias_qualifies() -> None:
    rw = rewrite_returning("update tb_post p set title = $1 where title like $2 "
                           "returning p.pk_post as x, *", POST, (), False)
    assert rw is not None and rw.client_columns
    assert targets(rw.sql) == ["p.pk_post AS x", "*", "CAST(p.pk_post AS pg_catalog.text)"]
    assert "$1" in rw.sql and "$2" in rw.sql


def test_insert_select_and_upsert() -> None:
    rw = rewrite_returning("INSERT INTO tb_post SELECT 10 + pk_post, gen_random_uuid(), "
                           "fk_user, title FROM tb_post", POST, (), False)
    assert rw is not None and rw.op == "insert"
    assert targets(rw.sql) == ["CAST(tb_post.pk_post AS pg_catalog.text)"]
    sql = ("INSERT INTO tb_comment AS c (pk_comment, fk_post, text) SELECT pk_comment, 2, 'm' "
           "FROM tb_comment ON CONFLICT (pk_comment) DO UPDATE SET fk_post = excluded.fk_post")
    before = rewrite_returning(sql, COMMENT, AGG, False)
    assert before is not None and before.all_keys == ("post",)  # old parents unknown
    assert targets(before.sql) == ["CAST(c.pk_comment AS pg_catalog.text)",
                                   "CAST(c.fk_post AS pg_catalog.text)"]
    pg18 = rewrite_returning(sql, COMMENT, AGG, True)
    assert pg18 is not None and pg18.all_keys == ()
    assert pg18.columns[-1] == KeyColumn("post", "fk_post", old=True)
    assert targets(pg18.sql)[-1] == "CAST(old.fk_post AS pg_catalog.text)"
    nothing = rewrite_returning("INSERT INTO tb_post SELECT * FROM tb_post ON CONFLICT DO "
                                "NOTHING", POST, (), False)
    assert nothing is not None and nothing.all_keys == ()


def test_delete_returns_old_parents_on_every_version() -> None:
    for old_values in (False, True):
        rw = rewrite_returning("DELETE FROM tb_comment WHERE text = 'x'", COMMENT, AGG,
                               old_values)
        assert rw is not None and rw.op == "delete" and rw.all_keys == ()
        assert rw.columns == (KeyColumn("comment", "pk_comment"), KeyColumn("post", "fk_post"))
        assert rw.entities == ("comment", "post")


def test_moving_children_needs_old_values() -> None:
    sql = "UPDATE tb_comment SET fk_post = 2 WHERE text LIKE 'c%'"
    before = rewrite_returning(sql, COMMENT, AGG, False)
    assert before is not None and before.all_keys == ("post",)
    pg18 = rewrite_returning(sql, COMMENT, AGG, True)
    assert pg18 is not None and pg18.all_keys == ()
    assert KeyColumn("post", "fk_post", old=True) in pg18.columns
    # a child's other columns do not move it: no old values
    plain = rewrite_returning("UPDATE tb_comment SET text = 'y' WHERE text = 'x'", COMMENT, AGG,
                              False)
    assert plain is not None and plain.all_keys == () and plain.n_extra == 2


def test_pk_assignment_needs_postgresql_18() -> None:
    sql = "UPDATE tb_post SET pk_post = pk_post + 100 WHERE title = 'x'"
    assert rewrite_returning(sql, POST, (), False) is None  # the caller refreshes every row
    rw = rewrite_returning(sql, POST, (), True)
    assert rw is not None
    assert rw.columns == (KeyColumn("post", "pk_post"), KeyColumn("post", "pk_post", old=True))
    assert targets(rw.sql)[-1] == "CAST(old.pk_post AS pg_catalog.text)"


@pytest.mark.parametrize("sql", [
    "UPDATE tb_post SET title = 'a'; UPDATE tb_post SET title = 'b'",
    "WITH d AS (DELETE FROM tb_post RETURNING 1) UPDATE tb_post SET title = 'x'",
    "MERGE INTO tb_post t USING (VALUES (1)) s(k) ON t.pk_post = s.k "
    "WHEN MATCHED THEN UPDATE SET title = 'm'",
    "UPDATE tb_post SET title = 'x' RETURNING WITH (OLD AS o) o.title",
    "UPDATE tb_post AS old SET title = 'x'",
    "UPDATE other.tb_post SET title = 'x'",
    "UPDATE tb_user SET name = 'x'",
    "SELECT * FROM tb_post",
    "UPDATE tb_post SET title = ",
])
def test_left_alone(sql: str) -> None:
    assert rewrite_returning(sql, POST, (), True) is None


def test_read_only_ctes_are_fine() -> None:
    rw = rewrite_returning("WITH x AS (SELECT 1 AS k) DELETE FROM tb_post WHERE pk_post IN "
                           "(SELECT k FROM x)", POST, (), False)
    assert rw is not None and rw.op == "delete"


def test_rewrite_reparses_to_the_same_statement() -> None:
    sql = ("UPDATE tb_post SET title = E'a\\\\b' || $1::text, fk_user = (SELECT min(pk_user) "
           "FROM tb_user) WHERE title LIKE 'P%' AND fk_user = ANY($2) RETURNING title")
    rw = rewrite_returning(sql, POST, (), False)
    assert rw is not None
    again = pglast.parse_sql(rw.sql)[0].stmt
    orig = pglast.parse_sql(sql)[0].stmt
    again.returningClause.exprs = again.returningClause.exprs[:1]
    assert again == orig


def test_key_values() -> None:
    assert key_value(b"42", True) == 42
    assert key_value(b"-9000000000", True) == -9000000000
    assert key_value(b"6f1c8f54-0000-4000-8000-000000000000", False) == \
        "6f1c8f54-0000-4000-8000-000000000000"
    with pytest.raises(ValueError):
        key_value(b"x", True)


# --- stripping replies -------------------------------------------------------------------------

def body(msg: bytes) -> bytes:
    return msg[5:]


def test_row_description_loses_the_appended_fields() -> None:
    desc = B.row_description([("pk_post", B.INT8_OID), ("title", B.TEXT_OID),
                              ("pk_post", B.TEXT_OID)])
    assert strip_row_description(body(desc), 1) == B.row_description(
        [("pk_post", B.INT8_OID), ("title", B.TEXT_OID)])
    assert strip_row_description(body(B.row_description([("pk_post", B.TEXT_OID)])), 1) is None
    with pytest.raises(ProtocolError):
        strip_row_description(body(desc), 4)


def test_data_row_split() -> None:
    row = B.data_row([b"1", None, b"hello", b"1", None])
    client, extra = split_data_row(body(row), 2)
    assert client == B.data_row([b"1", None, b"hello"])
    assert extra == [b"1", None]
    client, extra = split_data_row(body(B.data_row([b"7", b"3"])), 2)
    assert client is None and extra == [b"7", b"3"]
    assert D.data_row(body(B.data_row([b""]))) == [b""]
    client, extra = split_data_row(body(B.data_row([b"", b"9"])), 1)
    assert client == B.data_row([b""]) and extra == [b"9"]
    with pytest.raises(ProtocolError):
        split_data_row(body(row) + b"junk", 2)
    with pytest.raises(ProtocolError):
        split_data_row(body(row), 6)


def bind_body(param_formats: list[int], values: list[bytes | None],
              result_formats: list[int]) -> tuple[bytes, int]:
    head = b"portal\x00stmt\x00"
    out = [head, pack("!H", len(param_formats)), *(pack("!H", f) for f in param_formats),
           pack("!H", len(values))]
    for v in values:
        out.append(pack("!i", -1) if v is None else pack("!i", len(v)) + v)
    out += [pack("!H", len(result_formats)), *(pack("!H", f) for f in result_formats)]
    return b"".join(out), len(head)


def test_bind_result_formats() -> None:
    for codes in ([], [0], [1]):  # zero or one code covers the appended columns as it is
        b, pos = bind_body([0, 1], [b"x", None], codes)
        assert extend_result_formats(b, pos, 2) is b
    b, pos = bind_body([1], [b"\x00\x00\x00\x01", b"", None], [1, 0, 1])
    got = extend_result_formats(b, pos, 2)
    assert got == bind_body([1], [b"\x00\x00\x00\x01", b"", None], [1, 0, 1, 0, 0])[0]
    assert D.bind_params(got, pos) == D.bind_params(b, pos)
    with pytest.raises(ProtocolError):
        extend_result_formats(b + b"\x00", pos, 1)


def test_message_length_and_execute_portal() -> None:
    row = B.data_row([b"abc"])
    assert message_length(row, 0) == len(row)
    assert message_length(b"xx" + row, 2) == len(row)
    assert D.execute_portal(b"p1\x00\x00\x00\x00\x00") == b"p1"


@pytest.mark.parametrize("tail", ["", ";", " ; ", " -- a note; RETURNING x\n;", " /* c */"])
def test_key_columns_go_after_the_last_token(tail: str) -> None:
    sql = "UPDATE tb_post SET title = 'x' WHERE title LIKE 'y%'" + tail
    rw = rewrite_returning(sql, POST, (), False)
    assert rw is not None
    assert rw.sql == ("UPDATE tb_post SET title = 'x' WHERE title LIKE 'y%' RETURNING "
                      'CAST("tb_post"."pk_post" AS pg_catalog.text)' + tail)
    assert targets(rw.sql) == ["CAST(tb_post.pk_post AS pg_catalog.text)"]


def test_texts_differing_in_literals_are_decided_once() -> None:
    from tvproxy.tview import returning

    returning._splice.cache_clear()
    for i in range(5):
        rw = rewrite_returning(f"UPDATE tb_post SET title = title || '{i}' WHERE pk_post "
                               f"BETWEEN {i} AND {i + 999}", POST, (), False)
        assert rw is not None and rw.sql.endswith(
            f"BETWEEN {i} AND {i + 999} RETURNING CAST(\"tb_post\".\"pk_post\" AS "
            f"pg_catalog.text)")
    info = returning._splice.cache_info()
    assert info.misses == 1 and info.hits == 4
