"""The persisted refresh queue of a prepared transaction (tview/twophase.py), without a server."""

from __future__ import annotations

from tvproxy.tview.planner import ALL_KEYS
from tvproxy.tview.twophase import PersistedQueues, decode_keys, encode_keys, summarize_keys


def test_round_trip() -> None:
    keys = {"user": {2, 1}, "post": {ALL_KEYS, 3}, "tag": {"a-b"}, "none": set()}
    text = encode_keys(keys, everything=["company"])
    assert decode_keys(text) == {"user": {1, 2}, "post": {ALL_KEYS}, "tag": {"a-b"},
                                 "company": {ALL_KEYS}}


def test_summary_counts_keys_per_entity() -> None:
    text = encode_keys({"user": {2, 1}, "post": {ALL_KEYS}}, everything=["company"])
    assert summarize_keys(text) == "company:*,post:*,user:2"
    assert summarize_keys("{}") == ""


def test_persisted_queues_are_bounded_and_pruned() -> None:
    reg = PersistedQueues(limit=2, settle=0.0)
    reg.record("g1", "app", "{}")
    reg.record("g2", "app", "{}")
    reg.record("g3", "app2", "{}")
    assert reg.get("app", "g1") is None and reg.get("app", "g2") is not None  # oldest out
    reg.prune("app", alive=set())
    assert reg.get("app", "g2") is None and reg.has("app2") and not reg.has("app")
    reg.forget("app2", ["g3"])
    assert not reg.entries
