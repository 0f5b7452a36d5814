"""Client startup parameters: which are tracked, and the SQL that re-applies them on a server."""

from __future__ import annotations

import re

from tvproxy.protocol.errors import ProtocolError

NOT_TRACKED = frozenset({"user", "database", "replication", "options"})
# settings PostgreSQL reports with ParameterStatus that follow a client from server to server
REPORTED_TRACKED = frozenset({
    "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "standard_conforming_strings",
    "application_name", "search_path", "default_transaction_read_only",
})
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.$]*$")


def parse_options(options: str) -> dict[str, str]:
    """Settings from a libpq ``options`` string (``-c key=value`` / ``--key=value``)."""
    out: dict[str, str] = {}
    tokens: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            tok = tokens[i + 1]
            i += 1
        elif tok.startswith("-c") or tok.startswith("--"):
            tok = tok[2:]
        else:
            raise ProtocolError(f"unsupported startup option {tok!r}", "08P01")
        key, sep, value = tok.partition("=")
        if not sep:
            raise ProtocolError(f"invalid startup option {tok!r}: expected key=value", "08P01")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def tracked_params(startup: dict[str, str], ignore: frozenset[str] = frozenset()) -> dict[str, str]:
    """The settings a client asked for at startup, to be kept on whatever server it lands on."""
    params = {k: v for k, v in startup.items() if k not in NOT_TRACKED and k not in ignore}
    if startup.get("options"):
        params.update({k: v for k, v in parse_options(startup["options"]).items() if k not in ignore})
    for key in params:
        if not _GUC_NAME.match(key):
            raise ProtocolError(f'unrecognized configuration parameter "{key}"', "42704")
    if "client_encoding" in params and params["client_encoding"].lower().replace("-", "") in (
        "utf8", "unicode"
    ):
        params["client_encoding"] = "UTF8"
    return params


def quote_literal(value: str) -> str:
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def apply_sql(
    wanted: dict[str, str], server_params: dict[str, str], server_defaults: dict[str, str],
    server_set: set[str],
) -> str:
    """SQL making a server's settings match ``wanted`` ('' when they already do).

    Keys the server had set for an earlier client but this client does not care about go back
    to the server's login value (or RESET), so nothing leaks between clients.  Values go
    through ``set_config`` so they are read as in a startup packet or postgresql.conf (a
    ``search_path`` of ``a,b`` is two schemas, not one named "a,b").
    """
    sets: list[str] = []
    resets: list[str] = []
    for key, value in wanted.items():
        if server_params.get(key) != value:
            sets.append(f"pg_catalog.set_config({quote_literal(key)}, {quote_literal(value)}, false)")
    for key in server_set:
        if key in wanted:
            continue
        default = server_defaults.get(key)
        if default is None:
            resets.append(f'RESET "{key}"')
        elif server_params.get(key) != default:
            sets.append(f"pg_catalog.set_config({quote_literal(key)}, {quote_literal(default)}, false)")
    stmts = resets
    if sets:
        stmts.append("SELECT " + ", ".join(sets))
    return ";".join(stmts)
