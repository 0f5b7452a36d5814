"""The persisted refresh queue of a prepared transaction (tview/twophase.py), without a server."""

from __future__ import annotations

from tvproxy.tview.planner import ALL_KEYS
from tvproxy.tview.twophase import decode_keys, encode_keys


def test_round_trip() -> None:
    keys = {"user": {2, 1}, "post": {ALL_KEYS, 3}, "tag": {"a-b"}, "none": set()}
    text = encode_keys(keys, everything=["company"])
    assert decode_keys(text) == {"user": {1, 2}, "post": {ALL_KEYS}, "tag": {"a-b"},
                                 "company": {ALL_KEYS}}
