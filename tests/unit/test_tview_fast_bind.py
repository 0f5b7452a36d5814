"""Which prepared writes a Bind records without the whole capture path
(tview/bound.py: fast_bind), and that the decision agrees with what the whole path
would do for it."""

from __future__ import annotations

from tvproxy.tview.bound import FastBind, fast_bind
from tvproxy.tview.capture import KeyRef, WriteCapture
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.statement import Kind, Statement


def _cat(**kw: object) -> RuntimeCatalog:
    cat = RuntimeCatalog(key_types={"user": "bigint", "post": "bigint"})
    for k, v in kw.items():
        setattr(cat, k, v)
    return cat


def _write(op: str = "update", keys: tuple[KeyRef, ...] | None = (KeyRef(param=2),),
           entity: str = "user", key_columns: bool = False, returning: bool = False,
           assigns_pk: bool = False) -> WriteCapture:
    return WriteCapture(f"tb_{entity}", entity, op, keys, key_columns, returning, assigns_pk)


def _st(*writes: WriteCapture, kind: int = Kind.WRITE) -> Statement:
    return Statement(kind, (None,), writes)


def test_one_key_named_by_a_parameter_is_recorded_at_the_bind() -> None:
    assert fast_bind(_st(_write()), _cat()) == FastBind("user", 1, "bigint")
    assert fast_bind(_st(_write("insert", (KeyRef(param=1),), "post")), _cat()) == FastBind(
        "post", 0, "bigint")
    assert fast_bind(_st(_write("delete")), _cat()) == FastBind("user", 1, "bigint")


def test_everything_else_takes_the_whole_path() -> None:
    cat = _cat()
    assert fast_bind(_st(_write(keys=(KeyRef(value=5),))), cat) is None  # a literal key
    assert fast_bind(_st(_write(keys=None)), cat) is None  # keys unknown: RETURNING
    assert fast_bind(_st(_write(keys=(KeyRef(param=1, array=True),))), cat) is None
    assert fast_bind(_st(_write(keys=(KeyRef(param=1), KeyRef(param=2)))), cat) is None
    assert fast_bind(_st(_write(assigns_pk=True)), cat) is None  # the new pk is unknown
    assert fast_bind(_st(_write(returning=True)), cat) is None
    assert fast_bind(_st(_write("merge")), cat) is None
    assert fast_bind(_st(_write(), _write(entity="post")), cat) is None
    assert fast_bind(_st(_write(), kind=Kind.WRITE | Kind.TX), cat) is None
    assert fast_bind(_st(_write(), kind=Kind.WRITE | Kind.READS_TV), cat) is None
    assert fast_bind(_st(_write(), kind=Kind.WRITE | Kind.OPAQUE), cat) is None


def test_writes_whose_old_parents_matter_take_the_whole_path() -> None:
    """A child aggregated into its parent: moving it (a key column) or deleting it needs its
    old parent (a pre-image or RETURNING), as the whole path decides it; a TVIEW refreshed
    whole on it needs every key."""
    agg = _cat(aggregated_into={"post": ["user"]})
    assert fast_bind(_st(_write(entity="post")), agg) == FastBind("post", 1, "bigint")
    assert fast_bind(_st(_write(entity="post", key_columns=True)), agg) is None
    assert fast_bind(_st(_write("delete", entity="post")), agg) is None
    assert fast_bind(_st(_write("insert", entity="post", key_columns=True)), agg) is None
    full = _cat(full_on={"user": ["stats"]})
    assert fast_bind(_st(_write()), full) is None
