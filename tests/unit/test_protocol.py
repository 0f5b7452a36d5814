"""The sans-I/O wire protocol: framing under arbitrary splits, startup packets, builders."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvproxy.protocol import CONTINUATION, Framer, ProtocolError
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D

message_types = st.sampled_from(list(b"QPBDESCHdcfXT1Z23nNKRA"))
messages = st.builds(lambda t, body: bytes([t]) + struct.pack("!I", len(body) + 4) + body,
                     message_types, st.binary(max_size=300))


def collect(framer: Framer, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """Reassemble messages, gluing streamed pieces back together."""
    out: list[tuple[int, bytes]] = []
    partial: bytearray | None = None
    for chunk in chunks:
        framer.feed(chunk)
        while (m := framer.next()) is not None:
            mtype, start, end = m
            piece = bytes(framer.buffer[start:end])
            if mtype == CONTINUATION:
                assert partial is not None
                partial += piece
            else:
                partial = bytearray(piece)
                out.append((mtype, b""))
            total = struct.unpack_from("!I", partial, 1)[0] + 1 if len(partial) >= 5 else -1
            if len(partial) == total:
                out[-1] = (partial[0], bytes(partial))
                partial = None
    assert partial is None
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@given(st.lists(messages, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
@settings(max_examples=300)
def test_any_split_gives_the_same_messages(msgs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(msgs)
    got = collect(Framer(), split_at(stream, cuts))
    assert got == [(m[0], m) for m in msgs]


@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(min_value=0), max_size=10))
@settings(max_examples=200)
def test_streamed_large_messages_reassemble(msgs: list[bytes], cuts: list[int]) -> None:
    big = b"D" + struct.pack("!I", 4 + 5000) + bytes(range(256)) * 19 + b"x" * 136
    stream = b"".join(msgs) + big + b"".join(msgs)
    framer = Framer(stream_threshold=100)
    got = collect(framer, split_at(stream, cuts))
    assert got == [(m[0], m) for m in [*msgs, big, *msgs]]


def test_large_datarow_is_handed_out_before_it_is_complete() -> None:
    framer = Framer(stream_threshold=1000)
    big = b"D" + struct.pack("!I", 4 + 100_000) + b"a" * 100_000
    framer.feed(big[:5000])
    first = framer.next()
    assert first is not None and first[0] == ord("D") and first[2] - first[1] == 5000
    framer.feed(big[5000:])
    rest = framer.next()
    assert rest is not None and rest[0] == CONTINUATION and rest[2] - rest[1] == len(big) - 5000


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_bytes_frame_or_fail_cleanly(data: bytes) -> None:
    framer = Framer(max_size=10_000)
    try:
        framer.feed(data)
        while framer.next() is not None:
            pass
    except ProtocolError as exc:
        assert exc.sqlstate in ("08P01", "54000")


def test_bad_lengths_are_protocol_errors() -> None:
    for header in (b"Q\x00\x00\x00\x03", b"Q\x00\x00\x00\x00"):
        framer = Framer()
        framer.feed(header)
        with pytest.raises(ProtocolError):
            framer.next()
    framer = Framer(max_size=1000)
    framer.feed(b"Q" + struct.pack("!I", 5000))
    with pytest.raises(ProtocolError) as err:
        framer.next()
    assert err.value.sqlstate == "54000"


def test_truncated_message_waits_for_more() -> None:
    framer = Framer()
    msg = B.query("select 1")
    framer.feed(msg[:-1])
    assert framer.next() is None
    framer.feed(msg[-1:])
    m = framer.next()
    assert m is not None and bytes(framer.buffer[m[1]:m[2]]) == msg


def test_unread_gives_back_a_message() -> None:
    framer = Framer()
    framer.feed(B.query("a") + B.SYNC)
    first = framer.next()
    assert first is not None
    framer.unread(first[1])
    again = framer.next()
    assert again == first


# --- startup packets -------------------------------------------------------------------------

def test_startup_message_roundtrip() -> None:
    pkt = B.startup_message({"user": "alice", "database": "app", "application_name": "x"})
    parsed = D.parse_startup(pkt)
    assert isinstance(parsed, D.StartupMessage)
    assert parsed.params == {"user": "alice", "database": "app", "application_name": "x"}
    assert (parsed.major, parsed.minor) == (3, 0)


def test_ssl_gss_cancel_packets() -> None:
    assert isinstance(D.parse_startup(B.ssl_request()), D.SSLRequest)
    assert isinstance(D.parse_startup(struct.pack("!II", 8, B.GSSENC_REQUEST_CODE)), D.GSSENCRequest)
    cancel = D.parse_startup(B.cancel_request(1234, 0xDEADBEEF))
    assert cancel == D.CancelRequest(1234, 0xDEADBEEF)


def test_minor_version_and_protocol_options_are_reported() -> None:
    body = struct.pack("!I", (3 << 16) | 2) + b"user\x00u\x00_pq_.foo\x00bar\x00\x00"
    parsed = D.parse_startup(struct.pack("!I", len(body) + 4) + body)
    assert isinstance(parsed, D.StartupMessage)
    assert parsed.minor == 2 and parsed.unknown_options == ["_pq_.foo"]
    assert parsed.params == {"user": "u"}


@pytest.mark.parametrize("packet", [
    struct.pack("!II", 8, 2 << 16),  # protocol 2
    struct.pack("!II", 9, 196608) + b"u",  # no terminator
    struct.pack("!II", 12, 196608) + b"user",  # unterminated key
    struct.pack("!II", 16, B.CANCEL_REQUEST_CODE)[:8] + b"\x00" * 4,  # short cancel
])
def test_bad_startup_packets(packet: bytes) -> None:
    with pytest.raises(ProtocolError):
        D.parse_startup(packet)


@pytest.mark.parametrize("length", [0, 3, 7, 10_001, 2**31])
def test_startup_length_bounds(length: int) -> None:
    with pytest.raises(ProtocolError):
        D.startup_packet_length(struct.pack("!I", length % 2**32))


@given(st.binary(max_size=64))
def test_random_startup_packets_fail_cleanly(payload: bytes) -> None:
    pkt = struct.pack("!I", len(payload) + 4) + payload
    try:
        D.parse_startup(pkt)
    except ProtocolError:
        pass


# --- builders and decoders -------------------------------------------------------------------

def test_error_response_fields() -> None:
    msg = B.error_response("28P01", "password authentication failed", "FATAL", hint="check it")
    fields = D.error_fields(msg[5:])
    assert fields["C"] == "28P01" and fields["S"] == "FATAL" and fields["H"] == "check it"
    assert struct.unpack_from("!I", msg, 1)[0] == len(msg) - 1


def test_parse_bind_describe_decoding() -> None:
    parse = B.parse(b"s1", b"select $1", [23])
    name, sql, pos = D.parse_message(parse[5:])
    assert (name, sql) == (b"s1", b"select $1")
    assert parse[5:][pos:] == b"select $1\x00" + struct.pack("!HI", 1, 23)
    bind_body = b"portal\x00s1\x00" + struct.pack("!HH", 0, 0) + struct.pack("!H", 0)
    portal, stmt, after = D.bind_names(bind_body)
    assert (portal, stmt) == (b"portal", b"s1") and bind_body[after:] == struct.pack("!HHH", 0, 0, 0)
    assert D.describe_or_close(b"Ss1\x00") == (ord("S"), b"s1")
    with pytest.raises(ProtocolError):
        D.describe_or_close(b"Xs1\x00")
    with pytest.raises(ProtocolError):
        D.parse_message(b"s1\x00select\x00\x00\x05")


_PARAMS = st.lists(st.one_of(st.none(), st.binary(max_size=12)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(values=_PARAMS, nfmt=st.sampled_from([0, 1, -1]), data=st.data())
def test_bind_param_reads_one_parameter_as_bind_params_reads_all(
        values: list[bytes | None], nfmt: int, data: st.DataObject) -> None:
    formats = [] if nfmt == 0 else [1] if nfmt == 1 else data.draw(
        st.lists(st.sampled_from([0, 1]), min_size=len(values), max_size=len(values)))
    body = b"p\x00s\x00" + struct.pack(f"!H{len(formats)}H", len(formats), *formats)
    body += struct.pack("!H", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    body += b"\x00\x00"
    pos = D.bind_names(body)[2]
    fmts, vals = D.bind_params(body, pos)
    for i, v in enumerate(vals):
        fmt = fmts[i] if len(fmts) > 1 else (fmts[0] if fmts else 0)
        assert D.bind_param(body, pos, i) == (fmt, v)
    assert D.bind_param(body, pos, len(values)) is None
    if values and values[-1]:  # cut inside the last value: an error, never a short value
        with pytest.raises(struct.error):
            D.bind_param(body[:len(body) - 3], pos, len(values) - 1)


def test_row_description_and_data_row() -> None:
    rd = B.row_description([("a", B.TEXT_OID), ("b", B.INT8_OID)])
    assert rd[0:1] == b"T" and struct.unpack_from("!H", rd, 5)[0] == 2
    dr = B.data_row(["x", None, 5])
    assert dr[5:7] == b"\x00\x03" and b"\xff\xff\xff\xff" in dr


def test_negotiate_protocol_version() -> None:
    msg = B.negotiate_protocol_version(0, ["_pq_.foo"])
    assert msg[0:1] == b"v"
    assert struct.unpack_from("!II", msg, 5) == (0, 1)


def test_parameter_status_and_backend_key() -> None:
    ps = B.parameter_status("TimeZone", "UTC")
    assert D.parameter_status(ps[5:]) == ("TimeZone", "UTC")
    assert D.backend_key(B.backend_key_data(42, 7)[5:]) == (42, 7)


@given(st.lists(messages, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
@settings(max_examples=300)
def test_scan_hands_out_what_next_would(msgs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(msgs) + b"D" + struct.pack("!I", 4 + 3000) + b"z" * 3000
    by_next, by_scan = Framer(stream_threshold=500), Framer(stream_threshold=500)
    for chunk in split_at(stream, cuts):
        by_next.feed(chunk)
        by_scan.feed(chunk)
        expected = []
        while (m := by_next.next()) is not None:
            expected.append((m[0], bytes(by_next.buffer[m[1]:m[2]])))
        got = [(t, bytes(by_scan.buffer[a:b])) for t, a, b in by_scan.scan()]
        assert got == expected
