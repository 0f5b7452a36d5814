"""Builders for every message the proxy writes itself (both directions)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from struct import pack

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

TEXT_OID = 25
INT8_OID = 20
INT4_OID = 23


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + pack("!I", len(body) + 4) + body


def cstr(value: str | bytes) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    return value + b"\x00"


# --- server -> client ------------------------------------------------------------------------

def auth_ok() -> bytes:
    return message(b"R", pack("!I", 0))


def auth_cleartext() -> bytes:
    return message(b"R", pack("!I", 3))


def auth_md5(salt: bytes) -> bytes:
    return message(b"R", pack("!I", 5) + salt)


def auth_sasl(mechanisms: Sequence[str]) -> bytes:
    return message(b"R", pack("!I", 10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", pack("!I", 11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", pack("!I", 12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", pack("!iI", pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(sqlstate), b"M", cstr(text)]
    if detail:
        parts += [b"D", cstr(detail)]
    if hint:
        parts += [b"H", cstr(hint)]
    parts.append(b"\x00")
    return b"".join(parts)


def error_response(
    sqlstate: str, text: str, severity: str = "ERROR", detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def notice_response(text: str, sqlstate: str = "00000", severity: str = "NOTICE") -> bytes:
    return message(b"N", _fields(severity, sqlstate, text, None, None))


def negotiate_protocol_version(minor: int, unknown_options: Iterable[str]) -> bytes:
    opts = list(unknown_options)
    return message(b"v", pack("!II", minor, len(opts)) + b"".join(cstr(o) for o in opts))


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    body = [pack("!H", len(columns))]
    for name, oid in columns:
        size = 8 if oid == INT8_OID else 4 if oid == INT4_OID else -1
        body.append(cstr(name) + pack("!IhIhih", 0, 0, oid, size, -1, 0))
    return message(b"T", b"".join(body))


def data_row(values: Sequence[object]) -> bytes:
    body = [pack("!H", len(values))]
    for v in values:
        if v is None:
            body.append(pack("!i", -1))
        else:
            b = v if isinstance(v, bytes) else str(v).encode()
            body.append(pack("!i", len(b)) + b)
    return message(b"D", b"".join(body))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def empty_query_response() -> bytes:
    return message(b"I")


def parse_complete() -> bytes:
    return PARSE_COMPLETE


def bind_complete() -> bytes:
    return BIND_COMPLETE


def close_complete() -> bytes:
    return CLOSE_COMPLETE


def no_data() -> bytes:
    return NO_DATA


def parameter_description(oids: Sequence[int]) -> bytes:
    return message(b"t", pack("!H", len(oids)) + b"".join(pack("!I", o) for o in oids))


PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"

# --- client -> server ------------------------------------------------------------------------

def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = pack("!I", version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return pack("!I", len(body) + 4) + body


def ssl_request() -> bytes:
    return pack("!II", 8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return pack("!IIiI", 16, CANCEL_REQUEST_CODE, pid, secret)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + pack("!i", len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def query(sql: str | bytes) -> bytes:
    return message(b"Q", cstr(sql))


def parse(name: bytes, sql: bytes, param_oids: Sequence[int] = ()) -> bytes:
    return message(
        b"P",
        name + b"\x00" + sql + b"\x00" + pack("!H", len(param_oids))
        + b"".join(pack("!I", o) for o in param_oids),
    )


def parse_raw(name: bytes, rest: bytes) -> bytes:
    """A Parse whose body after the statement name is ``rest`` (query, types) verbatim."""
    return message(b"P", name + b"\x00" + rest)


def text_value(value: object) -> bytes | None:
    """A Python value as a text-format parameter: None is NULL, lists are 1-D arrays."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, list | tuple):
        items = (str(v) if isinstance(v, int) and not isinstance(v, bool)
                 else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
                 for v in value)
        return ("{" + ",".join(items) + "}").encode()
    return str(value).encode()


def bind(statement: bytes, values: Sequence[bytes | None], portal: bytes = b"") -> bytes:
    """Bind with text parameters (NULL for None) and text results."""
    body = portal + b"\x00" + statement + b"\x00" + pack("!HH", 0, len(values))
    for v in values:
        body += pack("!i", -1) if v is None else pack("!i", len(v)) + v
    return message(b"B", body + b"\x00\x00")


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return message(b"E", portal + b"\x00" + pack("!i", max_rows))


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\x00")


def sync() -> bytes:
    return SYNC


def terminate() -> bytes:
    return TERMINATE


SYNC = b"S\x00\x00\x00\x04"
EXECUTE = execute()  # the unnamed portal, every row
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
