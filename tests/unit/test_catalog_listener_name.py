"""The catalog listener's application_name: which catalog it follows, which generation it
acknowledges (tview/catalog.py)."""

from __future__ import annotations

from tvproxy.tview.catalog import listener_name, parse_listener_name


def test_round_trip() -> None:
    assert listener_name("tvproxy", None) == "tvproxy-listener tvproxy -"
    assert parse_listener_name(listener_name("tvproxy", None)) == ("tvproxy", None)
    assert parse_listener_name(listener_name("tvproxy", 12)) == ("tvproxy", 12)
    assert parse_listener_name(listener_name("my schema", 3)) == ("my schema", 3)


def test_fits_postgres_names() -> None:
    name = listener_name("s" * 63, 2**63 - 1)
    assert len(name.encode()) <= 63
    assert parse_listener_name(name) == ("s" * 24, 2**63 - 1)


def test_other_names_are_not_listeners() -> None:
    for name in ("", "psql", "tvproxy-listener", "tvproxy-listener tvproxy x", "tvproxy x 1"):
        assert parse_listener_name(name) is None
