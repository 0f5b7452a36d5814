"""The few asyncpg connection methods the TVIEW DDL code uses (``execute``, ``fetch``,
``fetchrow``, ``fetchval``, ``transaction``, ``is_in_transaction``), spoken over a client's own
server link, so that ``CREATE TABLE tv_x AS SELECT`` runs with the client's own settings
(search_path from its startup packet, ``options`` or SET): inside BEGIN in the client's
transaction, outside one in transactions the conversation opens and commits itself.

Each call is one extended-protocol batch (Parse, Bind with text parameters, Describe, Execute,
Sync) handed to ``send``, which returns the reply: the columns, the rows, the command tag and the
error, if any.  Values come back as text and are converted for the types the DDL code reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from struct import unpack_from
from typing import Any

from tvproxy.protocol import build as B
from tvproxy.protocol.decode import read_cstr

_INTS = {20, 21, 23, 26}
_BOOL = 16
_TEXT_ARRAYS = {1003, 1009, 1015}


@dataclass
class Reply:
    columns: list[tuple[str, int]] = field(default_factory=list)
    rows: list[list[bytes | None]] = field(default_factory=list)
    tag: str = ""
    error: dict[str, str] | None = None


class ServerError(Exception):
    """An ErrorResponse of the server, with its SQLSTATE (as asyncpg's errors carry it)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "server error"))
        self.sqlstate = fields.get("C", "XX000")


class Row:
    def __init__(self, names: list[str], values: list[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._names.index(key)]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)


def row_description(body: bytes) -> list[tuple[str, int]]:
    """(name, type oid) of every column of a RowDescription body."""
    (count,) = unpack_from("!h", body, 0)
    pos = 2
    out = []
    for _ in range(count):
        name, pos = read_cstr(body, pos)
        (oid,) = unpack_from("!I", body, pos + 6)
        out.append((name.decode(), oid))
        pos += 18
    return out


def text_array(text: str) -> list[str | None]:
    """A one-dimensional array in PostgreSQL's text form."""
    inner = text[1:-1]
    out: list[str | None] = []
    i = 0
    while i < len(inner):
        if inner[i] == '"':
            i += 1
            buf = []
            while inner[i] != '"':
                if inner[i] == "\\":
                    i += 1
                buf.append(inner[i])
                i += 1
            out.append("".join(buf))
            i += 2  # closing quote and comma
        else:
            end = inner.find(",", i)
            end = len(inner) if end < 0 else end
            item = inner[i:end]
            out.append(None if item == "NULL" else item)
            i = end + 1
    return out


def _value(raw: bytes | None, oid: int) -> Any:
    if raw is None:
        return None
    text = raw.decode()
    if oid in _INTS:
        return int(text)
    if oid == _BOOL:
        return text == "t"
    if oid in _TEXT_ARRAYS:
        return text_array(text)
    return text


def statement_batch(sql: str, args: tuple[Any, ...]) -> bytes:
    return (B.parse(b"", sql.encode()) + B.bind(b"", [B.text_value(a) for a in args])
            + B.message(b"D", b"P\x00") + B.execute() + B.SYNC)


class _Block:
    """``transaction()``: inside the client's own transaction block (or one this conversation
    opened) everything is already held; the outermost one the conversation opens itself
    sends BEGIN, and COMMIT or ROLLBACK as asyncpg's ``transaction()`` would."""

    def __init__(self, conv: ServerConversation) -> None:
        self._conv = conv
        self._own = False

    async def __aenter__(self) -> _Block:
        conv = self._conv
        if not conv.is_in_transaction():
            await conv.execute("BEGIN")
            self._own = True
        conv._depth += 1
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        conv = self._conv
        conv._depth -= 1
        if not self._own:
            return
        if exc_type is None:
            await conv.execute("COMMIT")
        else:
            try:
                await conv.execute("ROLLBACK")
            except ServerError:
                pass  # the original error is the one to report


class ServerConversation:
    def __init__(self, send: Callable[[bytes], Awaitable[Reply]], in_block: bool = True) -> None:
        """``in_block``: the client's transaction block holds the conversation (its
        ``transaction()`` opens nothing)."""
        self._send = send
        self._in_block = in_block
        self._depth = 0

    async def _run(self, sql: str, args: tuple[Any, ...]) -> tuple[Reply, list[Row]]:
        reply = await self._send(statement_batch(sql, args))
        if reply.error is not None:
            raise ServerError(reply.error)
        names = [n for n, _ in reply.columns]
        oids = [o for _, o in reply.columns]
        rows = [Row(names, [_value(v, o) for v, o in zip(r, oids, strict=False)])
                for r in reply.rows]
        return reply, rows

    async def execute(self, sql: str, *args: Any) -> str:
        reply, _ = await self._run(sql, args)
        return reply.tag

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return (await self._run(sql, args))[1]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return row[0] if row is not None and len(row) else None

    def transaction(self) -> _Block:
        return _Block(self)

    def is_in_transaction(self) -> bool:
        return self._in_block or self._depth > 0
