"""The TVIEW key tracker (savepoint stack) and the transaction-control classifier, without I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tvproxy.tview.tracker import TransactionTracker
from tvproxy.tview.txcontrol import TxCommand, TxKind, classify


def test_failed_statement_keys_are_dropped() -> None:
    t = TransactionTracker()
    t.touch("post", [1])
    t.statement_succeeded()
    t.touch("post", [2])
    t.statement_failed()
    assert t.pending() == {"post": {1}}


def test_record_is_touch_then_success() -> None:
    a, b = TransactionTracker(), TransactionTracker()
    for entity, pks in (("post", [1, 2]), ("post", [2]), ("user", [7]), ("post", [])):
        a.record(entity, pks)
        b.touch(entity, pks)
        b.statement_succeeded()
    a.savepoint("s")
    b.savepoint("s")
    a.record("post", [3])
    b.touch("post", [3])
    b.statement_succeeded()
    assert a.pending() == b.pending() == {"post": {1, 2, 3}, "user": {7}}
    assert a.take() == b.take() and a.taken_touches == b.taken_touches == {"post": 4, "user": 1}
    a.touch("post", [9])  # a statement still running: its keys count with the recorded ones
    a.record("user", [8])
    assert a.pending() == {"post": {9}, "user": {8}}


def test_rollback_to_keeps_the_savepoint_and_release_merges() -> None:
    t = TransactionTracker()
    t.touch("post", [1]); t.statement_succeeded()  # noqa: E702
    t.savepoint("a")
    t.touch("post", [2]); t.statement_succeeded()  # noqa: E702
    t.savepoint("b")
    t.touch("user", [7]); t.statement_succeeded()  # noqa: E702
    assert t.rollback_to("a") and t.depth == 1
    assert t.pending() == {"post": {1}}
    t.touch("post", [3]); t.statement_succeeded()  # noqa: E702
    assert t.rollback_to("a") and t.pending() == {"post": {1}}  # again: savepoint still there
    t.touch("post", [4]); t.statement_succeeded()  # noqa: E702
    assert t.release("a") and t.depth == 0
    assert t.pending() == {"post": {1, 4}}
    assert not t.release("a") and not t.rollback_to("nope")


def test_duplicate_names_mean_the_most_recent() -> None:
    t = TransactionTracker()
    t.savepoint("s")
    t.touch("c", [1]); t.statement_succeeded()  # noqa: E702
    t.savepoint("s")
    t.touch("c", [2]); t.statement_succeeded()  # noqa: E702
    assert t.rollback_to("s") and t.depth == 2 and t.pending() == {"c": {1}}
    assert t.release("s") and t.depth == 1
    assert t.release("s") and t.depth == 0 and t.pending() == {"c": {1}}


def test_take_flushes_only_what_is_asked() -> None:
    t = TransactionTracker()
    t.touch("post", [1]); t.touch("user", [2]); t.statement_succeeded()  # noqa: E702
    t.savepoint("a")
    t.touch("post", [3]); t.statement_succeeded()  # noqa: E702
    assert t.has_pending("post")
    assert t.take(["post"]) == {"post": {1, 3}}
    assert not t.has_pending("post") and t.pending() == {"user": {2}}
    assert t.take() == {"user": {2}} and t.pending() == {} and t.depth == 1
    t.reset()
    assert t.depth == 0


ops = st.one_of(
    st.tuples(st.just("touch"), st.sampled_from("ab"), st.integers(0, 5)),
    st.tuples(st.just("ok"), st.none(), st.none()),
    st.tuples(st.just("fail"), st.none(), st.none()),
    st.tuples(st.just("sp"), st.sampled_from(["x", "y"]), st.none()),
    st.tuples(st.just("rb"), st.sampled_from(["x", "y"]), st.none()),
    st.tuples(st.just("rel"), st.sampled_from(["x", "y"]), st.none()),
)


@given(st.lists(ops, max_size=40))
@settings(max_examples=300)
def test_matches_a_list_of_savepoint_snapshots(program: list[tuple]) -> None:
    """Reference model: the committed key set, with a snapshot taken at each SAVEPOINT."""
    t = TransactionTracker()
    keys: set[tuple[str, int]] = set()
    stmt: set[tuple[str, int]] = set()
    stack: list[tuple[str, set[tuple[str, int]]]] = []
    for op, a, b in program:
        if op == "touch":
            t.touch(a, [b])
            stmt.add((a, b))
        elif op == "ok":
            t.statement_succeeded()
            keys |= stmt
            stmt = set()
        elif op == "fail":
            t.statement_failed()
            stmt = set()
        elif op == "sp":
            t.statement_succeeded()
            keys |= stmt
            stmt = set()
            t.savepoint(a)
            stack.append((a, set(keys)))
        else:
            names = [n for n, _ in stack]
            found = a in names
            i = len(names) - 1 - names[::-1].index(a) if found else -1
            if op == "rb":
                assert t.rollback_to(a) == found
                if found:
                    keys = set(stack[i][1])
                    del stack[i + 1:]
                    stmt = set()
            else:
                assert t.release(a) == found
                if found:
                    del stack[i:]
        got = {(e, pk) for e, pks in t.pending().items() for pk in pks}
        assert got == keys
        assert t.depth == len(stack)


def test_classify_transaction_control() -> None:
    assert classify("select 1") == (None,)
    assert classify("BEGIN ISOLATION LEVEL REPEATABLE READ") == (TxCommand(TxKind.BEGIN),)
    assert classify("/* x */ commit and chain") == (TxCommand(TxKind.COMMIT_AND_CHAIN),)
    assert classify("END") == (TxCommand(TxKind.COMMIT),)
    assert classify("abort") == (TxCommand(TxKind.ROLLBACK),)
    assert classify('SAVEPOINT "My SP"') == (TxCommand(TxKind.SAVEPOINT, "My SP"),)
    assert classify("rollback to savepoint s1") == (TxCommand(TxKind.ROLLBACK_TO, "s1"),)
    assert classify("RELEASE s1") == (TxCommand(TxKind.RELEASE, "s1"),)
    assert classify("PREPARE TRANSACTION 'g'") == (TxCommand(TxKind.PREPARE, "g"),)
    assert classify("COMMIT PREPARED 'g'") == (TxCommand(TxKind.COMMIT_PREPARED, "g"),)
    assert classify("ROLLBACK PREPARED 'g'") == (TxCommand(TxKind.ROLLBACK_PREPARED, "g"),)
    assert classify("PREPARE q AS SELECT 1") == (None,)
    assert classify("insert into t values (1); commit") == (None, TxCommand(TxKind.COMMIT))
    assert classify("commit; (") == ()


def test_flush_is_undone_with_its_savepoint() -> None:
    t = TransactionTracker()
    t.touch("user", [1])
    t.statement_succeeded()
    t.savepoint("s")
    t.touch("post", [3])
    t.statement_succeeded()
    assert t.flush() == {"user": {1}, "post": {3}}
    assert t.pending() == {}  # refreshed once, not again at COMMIT
    t.rollback_to("s")  # the refresh ran inside s: undone, so user 1 (and post 3) are due again
    assert t.pending() == {"user": {1}, "post": {3}}
    t.savepoint("t")
    assert t.flush() == {"user": {1}, "post": {3}}
    t.release("t")
    t.rollback_to("s")
    assert t.pending() == {"user": {1}, "post": {3}}
    assert t.flush() and t.pending() == {}


def test_touches_count_repeats_for_keys_coalesced() -> None:
    t = TransactionTracker()
    for _ in range(10):  # ten writes of one row: one key, nine coalesced
        t.touch("user", [1])
        t.statement_succeeded()
    t.touch("post", [1, 2])
    t.statement_succeeded()
    t.savepoint("a")
    t.touch("post", [2])
    t.statement_succeeded()
    t.savepoint("b")
    t.touch("post", [3])
    t.statement_succeeded()
    assert t.rollback_to("b")  # undone: neither the key nor its touch counts
    assert t.release("a")
    t.touch("user", [2])
    t.statement_failed()  # a failed statement's touches go with it
    keys = t.take()
    assert keys == {"user": {1}, "post": {1, 2}}
    assert t.taken_touches == {"user": 10, "post": 3}
    assert t.take() == {} and t.taken_touches == {}
