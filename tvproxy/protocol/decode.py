"""Typed views of the messages the proxy reads (bodies without the 5-byte header)."""

from __future__ import annotations

from dataclasses import dataclass, field
from struct import error as struct_error
from struct import unpack_from

from tvproxy.protocol.build import CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE
from tvproxy.protocol.errors import ProtocolError

MAX_STARTUP_PACKET = 10000


def read_cstr(buf: bytes | bytearray | memoryview, pos: int) -> tuple[bytes, int]:
    end = bytes(buf).find(b"\x00", pos) if isinstance(buf, memoryview) else buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("invalid string in message")
    return bytes(buf[pos:end]), end + 1


# --- startup packets -------------------------------------------------------------------------

@dataclass
class SSLRequest:
    pass


@dataclass
class GSSENCRequest:
    pass


@dataclass
class CancelRequest:
    pid: int
    secret: int


@dataclass
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)
    unknown_options: list[str] = field(default_factory=list)


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def startup_packet_length(header: bytes | bytearray) -> int:
    """Length of the startup packet whose first 4 bytes are ``header`` (validated)."""
    (length,) = unpack_from("!I", header, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError(f"invalid length of startup packet: {length}")
    return length


def parse_startup(packet: bytes) -> StartupPacket:
    """Decode a whole startup-phase packet (length word included)."""
    if len(packet) < 8:
        raise ProtocolError("incomplete startup packet")
    length, code = unpack_from("!II", packet, 0)
    if length != len(packet):
        raise ProtocolError("invalid length of startup packet")
    if code == SSL_REQUEST_CODE and length == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and length == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise ProtocolError("invalid length of cancel request packet")
        pid, secret = unpack_from("!iI", packet, 8)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0", "0A000"
        )
    params: dict[str, str] = {}
    unknown: list[str] = []
    pos = 8
    while True:
        key, pos = read_cstr(packet, pos)
        if not key:
            break
        value, pos = read_cstr(packet, pos)
        try:
            k, v = key.decode(), value.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("invalid byte sequence in startup packet", "22021") from exc
        if k.startswith("_pq_."):
            unknown.append(k)
        else:
            params[k] = v
    if pos != len(packet):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    return StartupMessage(major, minor, params, unknown)


# --- backend messages -----------------------------------------------------------------------

def error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body keyed by their one-letter code."""
    out: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstr(body, pos + 1)
        out[code] = value.decode("utf-8", "replace")
    return out


def parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstr(body, 0)
    value, _ = read_cstr(body, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def backend_key(body: bytes) -> tuple[int, int]:
    try:
        return unpack_from("!iI", body, 0)
    except struct_error as exc:
        raise ProtocolError("invalid BackendKeyData") from exc


def auth_request(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("invalid authentication request")
    return unpack_from("!I", body, 0)[0], bytes(body[4:])


def sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode() for m in data.split(b"\x00") if m]


def command_tag(body: bytes) -> bytes:
    return bytes(body[:-1]) if body.endswith(b"\x00") else bytes(body)


# --- frontend messages ----------------------------------------------------------------------

def query_text(body: bytes) -> bytes:
    end = body.find(b"\x00")
    if end < 0:
        raise ProtocolError("invalid Query message: missing terminator")
    return bytes(body[:end])


def _two_cstrs(body: bytes) -> tuple[bytes, int, int]:
    """The body as bytes and the ends of its first two strings (each at its NUL), for the
    messages read on every statement (Parse, Bind): one ``find`` each."""
    if type(body) is not bytes:
        body = bytes(body)
    first = body.find(b"\x00")
    second = body.find(b"\x00", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolError("invalid string in message")
    return body, first, second


def parse_message(body: bytes) -> tuple[bytes, bytes, int]:
    """Parse body -> (statement name, query text, offset where the query text starts)."""
    body, first, second = _two_cstrs(body)
    end = second + 1
    if end + 2 > len(body):
        raise ProtocolError("invalid Parse message")
    (nparams,) = unpack_from("!H", body, end)
    if end + 2 + 4 * nparams != len(body):
        raise ProtocolError("invalid Parse message: bad parameter type count")
    return body[:first], body[first + 1:second], first + 1


def bind_names(body: bytes) -> tuple[bytes, bytes, int]:
    """Bind body -> (portal, statement name, offset just after the statement name)."""
    body, first, second = _two_cstrs(body)
    return body[:first], body[first + 1:second], second + 1


def execute_portal(body: bytes) -> bytes:
    """Execute body -> portal name."""
    portal, _ = read_cstr(body, 0)
    return portal


def describe_or_close(body: bytes) -> tuple[int, bytes]:
    """Describe/Close body -> (b'S' or b'P' as int, name)."""
    if len(body) < 2 or body[0] not in (0x53, 0x50):
        raise ProtocolError("invalid Describe/Close message")
    name, end = read_cstr(body, 1)
    return body[0], name


def password_payload(body: bytes) -> bytes:
    """Payload of a PasswordMessage (cleartext/md5): the string without its terminator."""
    return bytes(body[:-1]) if body.endswith(b"\x00") else bytes(body)


def sasl_initial(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstr(body, 0)
    if pos + 4 > len(body):
        raise ProtocolError("invalid SASLInitialResponse")
    (n,) = unpack_from("!i", body, pos)
    data = bytes(body[pos + 4: pos + 4 + n]) if n >= 0 else b""
    return mech.decode("ascii", "replace"), data


def _values(body: bytes, pos: int) -> list[bytes | None]:
    """A count (int16) then that many length-prefixed values (-1 = NULL), as in DataRow/Bind."""
    (n,) = unpack_from("!H", body, pos)
    pos += 2
    out: list[bytes | None] = []
    for _ in range(n):
        (size,) = unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(bytes(body[pos:pos + size]))
            pos += size
    return out


def data_row(body: bytes) -> list[bytes | None]:
    """DataRow body -> column values (None for NULL)."""
    return _values(body, 0)


def bind_results(body: bytes, pos: int) -> tuple[int, int]:
    """Bind body from just after the statement name -> (number of parameters, offset of the
    result format count).  Raises ``struct.error`` on a short body."""
    (nfmt,) = unpack_from("!H", body, pos)
    pos += 2 + 2 * nfmt
    (nparams,) = unpack_from("!H", body, pos)
    pos += 2
    for _ in range(nparams):
        (size,) = unpack_from("!i", body, pos)
        pos += 4 + max(size, 0)
    return nparams, pos


def bind_params(body: bytes, pos: int) -> tuple[list[int], list[bytes | None]]:
    """Bind body from just after the statement name -> (format codes, parameter values)."""
    (nfmt,) = unpack_from("!H", body, pos)
    formats = list(unpack_from(f"!{nfmt}H", body, pos + 2))
    return formats, _values(body, pos + 2 + 2 * nfmt)


def bind_param(body: bytes, pos: int, index: int) -> tuple[int, bytes | None] | None:
    """Bind body from just after the statement name -> (format code, value) of parameter
    ``index`` (0-based), the others skipped; None when there is no such parameter.  Raises
    ``struct.error`` on a short body."""
    (nfmt,) = unpack_from("!H", body, pos)
    fpos = pos + 2
    pos = fpos + 2 * nfmt
    (n,) = unpack_from("!H", body, pos)
    if index >= n:
        return None
    fmt = 0 if nfmt == 0 else unpack_from("!H", body, fpos + 2 * (index if nfmt > 1 else 0))[0]
    pos += 2
    for _ in range(index):
        (size,) = unpack_from("!i", body, pos)
        pos += 4 + max(size, 0)
    (size,) = unpack_from("!i", body, pos)
    if size < 0:
        return fmt, None
    pos += 4
    if pos + size > len(body):
        raise struct_error("Bind parameter past the end of the message")
    return fmt, bytes(body[pos:pos + size])
