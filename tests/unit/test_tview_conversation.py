"""The pure parts of the engine's conversation on a client's server (tview/conversation.py)."""

from __future__ import annotations

from tvproxy.protocol import build as B
from tvproxy.tview.conversation import _value, row_description, statement_batch, text_array


def test_text_arrays() -> None:
    assert text_array("{}") == []
    assert text_array("{public.tb_post,user}") == ["public.tb_post", "user"]
    assert text_array('{"a,b","q\\"x",NULL,"NULL"}') == ["a,b", 'q"x', None, "NULL"]


def test_row_description_and_values() -> None:
    body = B.row_description([("entity", 25), ("n", 20), ("ok", 16), ("src", 1009)])[5:]
    assert row_description(body) == [("entity", 25), ("n", 20), ("ok", 16), ("src", 1009)]
    assert _value(b"42", 20) == 42 and _value(b"f", 16) is False and _value(None, 25) is None
    assert _value(b"{a,b}", 1009) == ["a", "b"] and _value(b"x", 25) == "x"


def test_statement_batch_binds_text_parameters() -> None:
    batch = statement_batch("SELECT $1, $2, $3", ("x", None, ["a", 'b"']))
    assert batch.startswith(b"P") and batch.endswith(B.SYNC)
    assert b'{"a","b\\""}' in batch and b"\xff\xff\xff\xff" in batch  # NULL is length -1
