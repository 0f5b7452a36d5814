"""Split a PostgreSQL v3 byte stream into messages by their 5-byte header.

The framer never copies a message it only has to forward: it hands out
``(type, start, end)`` offsets into its current buffer.  A message larger than
``stream_threshold`` whose type is in ``stream_types`` (DataRow, CopyData) is
handed out in pieces as it arrives, so big results and COPY stream through
instead of being buffered whole; the continuation pieces carry type ``0``.
"""

from __future__ import annotations

from struct import unpack_from

from tvproxy.protocol.errors import ProtocolError

CONTINUATION = 0
DEFAULT_MAX_MESSAGE = 1 << 30
STREAM_TYPES = frozenset(b"dD")


class Framer:
    __slots__ = ("_buf", "_pos", "_skip", "max_size", "stream_threshold", "stream_types")

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_MESSAGE,
        stream_threshold: int = 65536,
        stream_types: frozenset[int] = STREAM_TYPES,
    ) -> None:
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._skip = 0
        self.max_size = max_size
        self.stream_threshold = stream_threshold
        self.stream_types = stream_types

    @property
    def buffer(self) -> bytes | bytearray:
        """The buffer the offsets returned by :meth:`next` point into."""
        return self._buf

    def feed(self, data: bytes) -> None:
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data
        elif isinstance(buf, bytearray):
            del buf[:pos]
            buf += data
        else:
            nb = bytearray(buf[pos:])
            nb += data
            self._buf = nb
        self._pos = 0

    @property
    def position(self) -> int:
        """Offset in :attr:`buffer` just past the last message handed out."""
        return self._pos

    def unread(self, start: int) -> None:
        """Give back the message handed out at ``start`` (and everything after it)."""
        self._pos = start
        self._skip = 0

    def pending(self) -> int:
        """Bytes received but not yet handed out."""
        return len(self._buf) - self._pos

    def next(self) -> tuple[int, int, int] | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if self._skip:
            if not avail:
                return None
            take = self._skip if self._skip < avail else avail
            self._skip -= take
            self._pos = pos + take
            return (CONTINUATION, pos, pos + take)
        if avail < 5:
            return None
        mtype = buf[pos]
        length = unpack_from("!I", buf, pos + 1)[0]
        if length < 4:
            raise ProtocolError(f"invalid message length {length} for message type {chr(mtype)!r}")
        if length > self.max_size:
            raise ProtocolError(
                f"message of type {chr(mtype)!r} is too large ({length} bytes)", "54000"
            )
        end = pos + 1 + length
        if end > pos + avail:
            if mtype in self.stream_types and length > self.stream_threshold and avail > 5:
                self._skip = end - (pos + avail)
                self._pos = pos + avail
                return (mtype, pos, pos + avail)
            return None
        self._pos = end
        return (mtype, pos, end)

    def scan(self) -> list[tuple[int, int, int]]:
        """Every message :meth:`next` would hand out now, in one call (the hot path's loop)."""
        out = []
        append = out.append
        if self._skip:
            m = self.next()
            if m is None:
                return out
            append(m)
        buf = self._buf
        pos = self._pos
        n = len(buf)
        max_size = self.max_size
        while n - pos >= 5:
            mtype = buf[pos]
            length = unpack_from("!I", buf, pos + 1)[0]
            end = pos + 1 + length
            if length < 4 or length > max_size or end > n:
                break  # next() reports the error, or streams/waits for the rest
            append((mtype, pos, end))
            pos = end
        self._pos = pos
        if n - pos >= 5:
            m = self.next()
            if m is not None:
                append(m)
        return out

    def split(self, data: bytes) -> list[tuple[int, bytes]]:
        """Feed ``data`` and return the complete messages as ``(type, whole message)``.

        Convenience for non-hot paths (login, admin console, tests).
        """
        self.feed(data)
        out = []
        while (m := self.next()) is not None:
            mtype, start, end = m
            out.append((mtype, bytes(self._buf[start:end])))
        return out
