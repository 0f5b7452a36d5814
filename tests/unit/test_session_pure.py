"""Pure helpers of the session layer: startup settings and the shared prepared-statement registry."""

from __future__ import annotations

import pytest

from tvproxy.protocol import ProtocolError
from tvproxy.session.params import apply_sql, parse_options, quote_literal, tracked_params
from tvproxy.session.prepared import PreparedRegistry


def test_parse_options_forms() -> None:
    assert parse_options("-c search_path=a,b --statement-timeout=5s -cTimeZone=UTC") == {
        "search_path": "a,b", "statement_timeout": "5s", "TimeZone": "UTC",
    }
    assert parse_options(r"-c application_name=a\ b") == {"application_name": "a b"}
    with pytest.raises(ProtocolError):
        parse_options("-x foo")
    with pytest.raises(ProtocolError):
        parse_options("-c novalue")


def test_tracked_params_drop_identity_and_check_names() -> None:
    got = tracked_params({"user": "u", "database": "d", "client_encoding": "utf-8",
                          "options": "-c search_path=s", "extra_float_digits": "3"},
                         frozenset({"extra_float_digits"}))
    assert got == {"client_encoding": "UTF8", "search_path": "s"}
    with pytest.raises(ProtocolError) as err:
        tracked_params({"bad;drop table x": "1"})
    assert err.value.sqlstate == "42704"


def test_quote_literal_is_injection_safe() -> None:
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\'b") == "E'a\\\\''b'"


def test_apply_sql_sets_differences_and_restores_leftovers() -> None:
    sql = apply_sql({"TimeZone": "UTC", "application_name": "x"},
                    {"TimeZone": "UTC", "application_name": "y", "search_path": "s"},
                    {"TimeZone": "UTC", "application_name": ""}, {"search_path", "application_name"})
    assert sql == ('RESET "search_path";'
                   "SELECT pg_catalog.set_config('application_name', 'x', false)")
    assert apply_sql({"TimeZone": "UTC"}, {"TimeZone": "UTC"}, {}, set()) == ""
    restore = apply_sql({}, {"TimeZone": "Asia/Tokyo"}, {"TimeZone": "UTC"}, {"TimeZone"})
    assert restore == "SELECT pg_catalog.set_config('TimeZone', 'UTC', false)"


def test_registry_shares_and_refcounts() -> None:
    reg = PreparedRegistry()
    a = reg.acquire(b"select 1\x00\x00\x00")
    b = reg.acquire(b"select 1\x00\x00\x00")
    c = reg.acquire(b"select 2\x00\x00\x00")
    assert a is b and a.server_name != c.server_name and len(reg) == 2
    assert a.parse_msg.startswith(b"P") and a.server_name + b"\x00select 1" in a.parse_msg
    reg.release(a)
    assert reg.lookup(b"select 1\x00\x00\x00") is a
    reg.release(b)
    assert reg.lookup(b"select 1\x00\x00\x00") is None and len(reg) == 1
