"""The one analysis of a statement text (tview/statement.py): values, caching by normalised text,
and agreement with a plain pglast parse of every text (capture / classify / is_opaque)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pglast
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvproxy.tview.capture import KeyRef, TrackedTable, WriteCapture, capture, capture_statement
from tvproxy.tview.opaque import function_pattern
from tvproxy.tview.statement import (
    NOT_A_KEY,
    NOTHING,
    UNSURE,
    Analyzer,
    Kind,
    literal_spans,
    literal_value,
)
from tvproxy.tview.txcontrol import TxCommand, TxKind, classify

POST = TrackedTable("tb_post", "post", "pk_post", frozenset({"pk_post", "fk_user"}), "public", 0)
USER = TrackedTable("tb_user", "user", "pk_user", frozenset({"pk_user", "fk_company"}))
TABLES = (POST, USER)


@dataclass
class Cat:
    tracked: tuple[TrackedTable, ...] = TABLES
    table_names: frozenset[str] = frozenset({"tb_post", "tb_user"})
    tv_tables: dict[str, str] = field(default_factory=lambda: {"tv_post": "post"})
    functions: re.Pattern[str] | None = field(
        default_factory=lambda: function_pattern(frozenset({"bump_post"})))
    trigger_tables: frozenset[str] = frozenset({"tb_audited"})
    audited: dict[str, str] = field(default_factory=lambda: {'"public"."tb_post"': "post"})


def analyzer() -> Analyzer:
    return Analyzer(Cat())


def test_untracked_traffic_never_reaches_pglast() -> None:
    a = analyzer()
    for sql in ("SELECT abalance FROM pgbench_accounts WHERE aid = 5",
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5;",
                "SET search_path = x", "VACUUM tb_post", "SELECT * FROM tb_post WHERE pk_post = 1"):
        assert a.analyze(sql) is NOTHING
    assert a.parses == 0
    assert a.analyze("SELECT data FROM tv_post WHERE pk_post = 1").kind == Kind.READS_TV
    assert a.analyze("select bump_post(1)").kind == Kind.OPAQUE
    assert a.analyze("CALL p()").kind == Kind.OPAQUE
    assert a.analyze("CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ "
                     "LANGUAGE sql").kind == Kind.RELOAD
    assert a.parses == 0


def test_texts_differing_in_literals_share_one_parse() -> None:
    a = analyzer()
    for i in range(50):
        st = a.analyze(f"UPDATE tb_user SET email = 'u' || {i * 7} || '-1@example.com' "
                       f"WHERE pk_user = {i}")
        assert st.kind == Kind.WRITE and st.tables == {"tb_user"}
        assert st.writes[0].keys == (KeyRef(value=i),)
    assert a.parses == 1
    st = a.analyze("UPDATE tb_user SET email = 'x' WHERE pk_user = 'it''s'")
    assert st.writes[0].keys == (KeyRef(value="it's"),)
    st = a.analyze("UPDATE tb_user SET email = 'x' WHERE pk_user = NULL")
    assert st.writes[0].keys is None  # as pglast reads it: no key, RETURNING decides
    assert a.parses == 2  # the string-key shape is another normalised text... once


def test_a_parameter_text_first_does_not_hide_the_literals_of_its_shape() -> None:
    a = analyzer()  # pgbench -M extended, then -M simple, on one proxy
    st = a.analyze("UPDATE tb_post SET title = $1 WHERE pk_post = $2")
    assert st.writes[0].keys == (KeyRef(param=2),)
    st = a.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post = 7")
    assert st.writes[0].keys == (KeyRef(value=7),)
    st = a.analyze("UPDATE tb_post SET title = $1 WHERE pk_post = $2")
    assert st.writes[0].keys == (KeyRef(param=2),)


def test_keys_from_literals_params_and_returning() -> None:
    a = analyzer()
    st = a.analyze("DELETE FROM tb_post WHERE pk_post IN (1, -2, $1)")
    assert st.writes[0].keys == (KeyRef(value=1), KeyRef(value=-2), KeyRef(param=1))
    st = a.analyze("DELETE FROM tb_post WHERE pk_post IN (3, - 4, $1)")
    assert st.writes[0].keys == (KeyRef(value=3), KeyRef(value=-4), KeyRef(param=1))
    assert a.parses == 1
    st = a.analyze("insert into tb_post values (9, 2, 'x'), (10, 2, 'y')")
    assert st.writes[0].keys == (KeyRef(value=9), KeyRef(value=10))
    assert a.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post > 3").writes[0].keys is None
    st = a.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post = ANY('{1,2}')")
    assert st.writes[0].keys is None
    st = a.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post = ANY($1)")
    assert st.writes[0].keys == (KeyRef(param=1, array=True),)


def test_odd_literals_are_read_by_pglast() -> None:
    a = analyzer()
    st = a.analyze("UPDATE tb_user SET email = E'a\\'b' WHERE pk_user = E'7'")
    assert st.writes[0].keys == (KeyRef(value="7"),)
    st = a.analyze("UPDATE tb_user SET email = $q$x$q$ WHERE pk_user = 0x10")
    assert st.writes[0].keys == capture("UPDATE tb_user SET email = $q$x$q$ WHERE pk_user = 0x10",
                                        TABLES)[0].keys


def test_transaction_control() -> None:
    a = analyzer()
    assert a.analyze("BEGIN").commands == (TxCommand(TxKind.BEGIN),)
    assert a.analyze("BEGIN") is a.analyze("BEGIN")  # no literal: one dict lookup
    st = a.analyze("begin; update tb_post set title = 'x' where pk_post = 5; savepoint s1")
    assert st.kind == Kind.TX | Kind.WRITE
    assert st.commands == (TxCommand(TxKind.BEGIN), None, TxCommand(TxKind.SAVEPOINT, "s1"))
    assert a.analyze("PREPARE TRANSACTION 'g1'").tx == (TxCommand(TxKind.PREPARE, "g1"),)
    assert a.analyze("PREPARE TRANSACTION 'g2'").tx == (TxCommand(TxKind.PREPARE, "g2"),)
    assert a.analyze("COMMIT PREPARED 'g2'").tx == (TxCommand(TxKind.COMMIT_PREPARED, "g2"),)
    assert a.analyze("UPDATE tb_post SET title = 'a'; COMMIT").ends_transaction
    assert a.analyze("BEGIN garbage").commands == ()  # PostgreSQL rejects it


def test_a_new_catalog_is_a_new_cache() -> None:
    a = analyzer()
    a.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post = 1")
    b = Analyzer(Cat(tracked=(USER,), table_names=frozenset({"tb_user"})))
    assert b.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post = 1") is NOTHING


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), ("-42", -42), ("- 7", -7), ("9999999999999", 9999999999999), ("'a''b'", "a'b"),
    ("''", ""), ("NULL", NOT_A_KEY), ("true", NOT_A_KEY), ("1.5", NOT_A_KEY), ("1e3", NOT_A_KEY),
    ("E'x'", UNSURE), ("$$x$$", UNSURE), ("0x1f", UNSURE), ("1_000", UNSURE),
])
def test_literal_values(text: str, value: object) -> None:
    assert literal_value(text) == value


def test_literal_spans() -> None:
    sql = "-- c $1\nupdate t set a = 'é' /* $2 */ where \"$3\" = -4 and b = $1"
    from pglast.parser import normalize

    spans = literal_spans(sql, normalize(sql))
    assert [sql[s:e] for s, e, _k in spans] == ["'é'", "-4"]
    assert literal_spans("update t set a = 1", "update t set a = $1 where") is None


_KEY = st.one_of(st.integers(-10**15, 10**15).map(str),
                 st.text("ab'xé 1", max_size=6).map(lambda s: "'" + s.replace("'", "''") + "'"),
                 st.sampled_from(["NULL", "true", "1.5", "E'q'", "$$z$$"]))
_TEMPLATES = [
    "UPDATE tb_user SET email = {0} || 'x' WHERE pk_user = {1}",
    "UPDATE tb_post SET title = {0} WHERE pk_post IN ({1}, {0}) AND fk_user = 3",
    "DELETE FROM tb_post p WHERE p.pk_post = {1}::bigint",
    "INSERT INTO tb_post (pk_post, fk_user, title) VALUES ({1}, {0}, 'a'), ({0}, 1, {1})",
    "INSERT INTO tb_post VALUES ({1}, 1, {0}) ON CONFLICT (pk_post) DO UPDATE SET title = {0}",
    "BEGIN; UPDATE tb_user SET name = {0} WHERE pk_user = {1}; SAVEPOINT a",
    "WITH x AS (UPDATE tb_post SET title = {0} WHERE pk_post = {1} RETURNING 1) SELECT * FROM x",
    "SELECT data FROM tv_post WHERE pk_post = {1}; UPDATE tb_post SET title={0} WHERE pk_post=$1",
    # where a shape's pattern could cut a text other than the lexer does: next to operators,
    # comments, a string continued on the next line, a minus sign
    "UPDATE tb_user SET email = {0}||'x' WHERE pk_user={1} -- 7 {0}\n",
    "UPDATE tb_user SET email = {0}\n'more' WHERE pk_user = -{1}",
    "DELETE FROM tb_post WHERE pk_post = {1}/*{0}*/;",
    "DELETE FROM tb_post WHERE pk_post = {1}-{0} ;",
    "UPDATE tb_post SET title = e{0} WHERE pk_post = {1}",
]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(_TEMPLATES), _KEY, _KEY)
def test_same_answer_as_parsing_each_text(template: str, a: str, b: str) -> None:
    sql = template.format(a, b)
    got = SHARED.analyze(sql)
    try:
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError:  # PostgreSQL rejects it: nothing to compare
        return
    want: list[WriteCapture] = []
    for raw in stmts:  # every statement (capture() alone skips texts opening with BEGIN)
        capture_statement(raw.stmt, {t.name: t for t in TABLES}, want)
    assert got.writes == tuple(want)
    assert got.commands == classify(sql)


SHARED = analyzer()


def test_a_parameterised_text_with_a_constant_is_normalised_once() -> None:
    """Drivers send the same text at every Parse; a constant that is not a key (here the
    'title ' prefix) changes nothing in what it writes, so the text is analysed once."""
    a = analyzer()
    sql = "UPDATE tb_post SET title = 'title ' || $1 WHERE pk_post = $2;"
    first = a.analyze(sql)
    assert first.kind == Kind.WRITE and first.tables == {"tb_post"}
    assert first.writes[0].keys == (KeyRef(param=2),)
    for _ in range(20):
        assert a.analyze(sql) is first
    assert a.normalized == 1 and a.parses == 1
    # a text whose literal is the key is still read value by value
    for i in range(3):
        st = a.analyze(f"UPDATE tb_post SET title = 'title ' || $1 WHERE pk_post = {i};")
        assert st.writes[0].keys == (KeyRef(value=i),)
    assert a.normalized == 2  # the first text of its shape; the next ones match its pattern


def test_texts_of_a_known_shape_are_not_normalised_again() -> None:
    """A text is looked up by its rough form (strings and digits blanked) before pglast sees
    it; texts of two shapes that share a rough form are each told apart by their pattern."""
    a = analyzer()
    for i, alias in enumerate(["t1", "t2", "t1", "t2", "t1"]):
        st = a.analyze(f"DELETE FROM tb_post {alias} WHERE {alias}.pk_post = {100 + i}")
        assert st.writes[0].keys == (KeyRef(value=100 + i),)
    assert a.normalized == 2
    # a literal of another form than the first text's (an integer for a string) is parsed
    a.analyze("UPDATE tb_post SET title = 'x' WHERE pk_post = 1")
    st = a.analyze("UPDATE tb_post SET title = 7 WHERE pk_post = 2")
    assert st.writes[0].keys == (KeyRef(value=2),)
    assert a.normalized == 4


def test_the_texts_of_a_shape_are_read_without_aligning_them() -> None:
    """After the first text of a shape, the literals of the next ones are found by the shape's
    own pattern (one regular expression), not by aligning the text with its normalised form."""
    import tvproxy.tview.statement as statement

    a = analyzer()
    calls = []
    real = statement.literal_spans

    def counting(sql: str, shape: str) -> list[tuple[int, int, int]] | None:
        calls.append(sql)
        return real(sql, shape)

    statement.literal_spans = counting  # type: ignore[assignment]
    try:
        for i in range(1, 6):
            got = a.analyze(f"UPDATE tb_user SET email = 'u{i}' || {i * 7} WHERE pk_user = {i};")
            assert got.writes[0].keys == (KeyRef(value=i),)
        # a negative key is not a plain integer: aligned, and still read right
        got = a.analyze("UPDATE tb_user SET email = 'u' || 3 WHERE pk_user = -4;")
        assert got.writes[0].keys == (KeyRef(value=-4),)
    finally:
        statement.literal_spans = real  # type: ignore[assignment]
    assert len(calls) == 2 and a.parses == 1


def test_a_run_of_one_shape_skips_the_rough_lookup() -> None:
    """Statements of one shape come in runs: the shape a text last matched is tried first, and
    a text of another shape in between is still told apart by its own pattern."""
    import tvproxy.tview.statement as statement

    a = analyzer()
    a.analyze("UPDATE tb_user SET email = 'a' WHERE pk_user = 1")
    a.analyze("DELETE FROM tb_post WHERE pk_post = 1")
    roughs = []
    real = statement._ROUGH

    class Counting:
        def sub(self, repl: str, sql: str) -> str:
            roughs.append(sql)
            return real.sub(repl, sql)

    statement._ROUGH = Counting()  # type: ignore[assignment]
    try:
        for i in range(2, 7):
            st = a.analyze(f"UPDATE tb_user SET email = 'u{i}' WHERE pk_user = {i}")
            assert st.writes[0].keys == (KeyRef(value=i),)
        assert len(roughs) == 1  # the first of the run only: then its shape is the last one
        st = a.analyze("DELETE FROM tb_post WHERE pk_post = 42")
        assert st.writes[0].table == "tb_post" and st.writes[0].keys == (KeyRef(value=42),)
        st = a.analyze("UPDATE tb_user SET email = 'z' WHERE pk_user = 9")
        assert st.writes[0].table == "tb_user" and st.writes[0].keys == (KeyRef(value=9),)
    finally:
        statement._ROUGH = real
    assert a.normalized == 2
