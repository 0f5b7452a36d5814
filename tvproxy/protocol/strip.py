"""Take the columns the proxy appended to a statement's RETURNING out of its replies (pure).

The proxy appends ``n_extra`` columns after the client's own (tview/returning.py).  What the
client sees is what PostgreSQL would have sent for its own statement:

- RowDescription: the first fields only; none left (no RETURNING of its own) means no
  RowDescription at all after a Query, and NoData after a Describe;
- DataRow: the first values only (none left: no DataRow); the appended values are handed back;
- Bind: one result format code per column is extended with text codes for the appended columns
  (zero or one code applies to every column as it is);
- CommandComplete, ParameterDescription and everything else: unchanged.

Bodies are message bodies (without the 5-byte header) unless the name says message.
"""

from __future__ import annotations

from struct import pack, unpack_from

from tvproxy.protocol.decode import bind_results
from tvproxy.protocol.errors import ProtocolError

NO_DATA = b"n\x00\x00\x00\x04"
_FIELD_TAIL = 18  # table oid, attnum, type oid, typlen, typmod, format


def strip_row_description(body: bytes | bytearray | memoryview, n_extra: int) -> bytes | None:
    """RowDescription message with the last ``n_extra`` fields removed; None when none remain."""
    (count,) = unpack_from("!H", body, 0)
    keep = count - n_extra
    if keep < 0:
        raise ProtocolError("RowDescription has fewer fields than the proxy appended")
    if keep == 0:
        return None
    raw = bytes(body)
    pos = 2
    for _ in range(keep):
        end = raw.find(b"\x00", pos)
        if end < 0:
            raise ProtocolError("invalid RowDescription")
        pos = end + 1 + _FIELD_TAIL
    out = pack("!H", keep) + raw[2:pos]
    return b"T" + pack("!I", len(out) + 4) + out


def split_data_row(body: bytes | bytearray | memoryview,
                   n_extra: int) -> tuple[bytes | None, list[bytes | None]]:
    """(DataRow message with the client's values, or None when it has none; the last
    ``n_extra`` values, None for NULL)."""
    (count,) = unpack_from("!H", body, 0)
    keep = count - n_extra
    if keep < 0:
        raise ProtocolError("DataRow has fewer values than the proxy appended")
    pos = 2
    for _ in range(keep):
        (size,) = unpack_from("!i", body, pos)
        pos += 4 + (size if size > 0 else 0)
    cut = pos
    extra: list[bytes | None] = []
    for _ in range(n_extra):
        (size,) = unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            extra.append(None)
        else:
            extra.append(bytes(body[pos:pos + size]))
            pos += size
    if pos != len(body):
        raise ProtocolError("invalid DataRow")
    if keep == 0:
        return None, extra
    out = pack("!H", keep) + bytes(body[2:cut])
    return b"D" + pack("!I", len(out) + 4) + out, extra


def extend_result_formats(body: bytes, pos: int, n_extra: int) -> bytes:
    """Bind body (``pos``: just after the statement name) whose per-column result format codes
    are extended with ``n_extra`` text codes; ``body`` itself when it has zero or one code."""
    _nparams, pos = bind_results(body, pos)
    (nres,) = unpack_from("!H", body, pos)
    if pos + 2 + 2 * nres != len(body):
        raise ProtocolError("invalid Bind message")
    if nres <= 1:
        return body
    return body[:pos] + pack("!H", nres + n_extra) + body[pos + 2:] + b"\x00\x00" * n_extra


def message_length(buf: bytes | bytearray, start: int) -> int:
    """Whole length (type byte included) of the message starting at ``start``."""
    return 1 + unpack_from("!I", buf, start + 1)[0]
