"""One admin console connection: the simple and the extended query protocol over the commands.

PgBouncer's console speaks only the simple protocol; this one also answers Parse/Bind/Describe/
Execute/Sync/Close/Flush, because psycopg 3 (pipeline mode, ``prepare=True``, binary cursors)
and asyncpg use them.  Statements are parsed at Parse time so Describe can answer with the
result's columns without running anything; Execute runs the command.  Result formats requested
in Bind are honoured (binary int8 and text).  After an error in extended mode everything up to
the next Sync is discarded, as PostgreSQL does.

A command that has to wait (``PAUSE`` until servers are released, ``WAIT_CLOSE``) parks the
session: no further message is read until it completes, then processing resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from struct import error as StructError
from struct import pack, unpack_from
from typing import TYPE_CHECKING, Any

from tvproxy.admin import commands as C
from tvproxy.admin.commands import AdminError, Command, Result
from tvproxy.log import get_logger
from tvproxy.protocol import CONTINUATION, ProtocolError
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D

if TYPE_CHECKING:
    from tvproxy.server import ProxyServer
    from tvproxy.session.client import ClientSession

log = get_logger("tvproxy.admin")

RFQ_IDLE = B.ready_for_query(b"I")
EMPTY_QUERY = B.empty_query_response()
NO_PARAMS = B.parameter_description(())
POLL_INTERVAL = 0.01


@dataclass
class Portal:
    command: Command | None  # None: empty query
    columns: C.Columns | None
    formats: list[int]


def row_description(columns: C.Columns, formats: Sequence[int]) -> bytes:
    body = [pack("!H", len(columns))]
    for (name, oid), fmt in zip(columns, formats, strict=True):
        size = 8 if oid == B.INT8_OID else -1
        body.append(B.cstr(name) + pack("!IhIhih", 0, 0, oid, size, -1, fmt))
    return B.message(b"T", b"".join(body))


def data_row(values: Sequence[Any], columns: C.Columns, formats: Sequence[int] | None) -> bytes:
    body = [pack("!H", len(values))]
    for i, value in enumerate(values):
        if value is None:
            body.append(b"\xff\xff\xff\xff")
            continue
        if formats is not None and formats[i] == 1 and columns[i][1] == B.INT8_OID:
            data = pack("!q", int(value))
        elif isinstance(value, bytes):
            data = value
        else:
            data = str(value).encode()
        body.append(pack("!i", len(data)) + data)
    return B.message(b"D", b"".join(body))


def result_formats(codes: Sequence[int], ncols: int) -> list[int]:
    if not codes:
        return [0] * ncols
    if any(c not in (0, 1) for c in codes):
        raise ProtocolError(f"unsupported format code: {next(c for c in codes if c not in (0, 1))}")
    if len(codes) == 1:
        return [codes[0]] * ncols
    if len(codes) != ncols:
        raise AdminError(
            "08P01", f"bind message has {len(codes)} result formats but query has {ncols} columns"
        )
    return list(codes)


def parse_bind(body: bytes) -> tuple[bytes, bytes, int, list[int]]:
    """Bind body -> (portal, statement, number of parameters, result format codes)."""
    try:
        portal, stmt, pos = D.bind_names(body)
        nparams, pos = D.bind_results(body, pos)
        (nres,) = unpack_from("!H", body, pos)
        codes = list(unpack_from(f"!{nres}h", body, pos + 2))
    except StructError as exc:
        raise ProtocolError("invalid Bind message") from exc
    if pos + 2 + 2 * nres != len(body):
        raise ProtocolError("invalid Bind message")
    return portal, stmt, nparams, codes


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class AdminSession:
    def __init__(self, proxy: ProxyServer, client: ClientSession) -> None:
        self.proxy = proxy
        self.client = client
        # Fixed at login, as PgBouncer: admin_users may run everything, stats_users only SHOW.
        self.is_admin = client.user in proxy.cfg.admin.admin_users
        self.statements: dict[bytes, Command | None] = {}
        self.portals: dict[bytes, Portal] = {}
        self.skipping = False  # an extended-protocol error: discard until Sync
        self.halted = False  # immediate SHUTDOWN: answer nothing more
        self._busy: asyncio.Task | None = None
        self._out: list[bytes] = []

    # --- entry point -----------------------------------------------------------------------

    def process(self) -> None:
        """Handle every complete message the client has sent (called on each received chunk)."""
        client = self.client
        framer = client.framer
        try:
            while self._busy is None and not self.halted and not client.closed:
                m = framer.next()
                if m is None:
                    break
                mtype, start, end = m
                self._message(mtype, bytes(framer.buffer[start + 5:end]))
        except ProtocolError as exc:
            self._flush()
            log.info("admin protocol error", client=client.id, error=exc.message)
            client.fatal(exc.sqlstate, exc.message)
            return
        self._flush()

    def require_admin(self) -> None:
        if not self.is_admin:
            raise AdminError("42501", "admin access needed")

    # --- output ----------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            if not self.client.closed:
                stats = self.client.stats
                if stats is not None:
                    stats.bytes_sent += len(data)
                self.client.write(data)

    def _error(self, exc: AdminError) -> None:
        self._out.append(B.error_response(exc.sqlstate, exc.message, "ERROR", exc.detail))

    def _emit(self, res: Result, describe: bool, formats: Sequence[int] | None = None) -> None:
        out = self._out
        out.extend(res.notices)
        columns = res.columns
        if columns is not None:
            if describe:
                out.append(row_description(columns, formats or [0] * len(columns)))
            out.extend(data_row(row, columns, formats) for row in res.rows)
        out.append(B.command_complete(res.tag))

    # --- dispatch --------------------------------------------------------------------------

    def _message(self, mtype: int, body: bytes) -> None:
        if mtype == 0x58:  # Terminate
            self._flush()
            self.client._close_transport()
            return
        if mtype == CONTINUATION or mtype in (0x64, 0x63, 0x66):  # copy data/done/fail: no COPY
            return
        if self.skipping and mtype != 0x53:
            return
        if mtype == 0x51:  # Query
            self._query(body)
        elif mtype == 0x53:  # Sync
            self.skipping = False
            self._out.append(RFQ_IDLE)
        elif mtype == 0x48:  # Flush: everything is written at the end of each chunk anyway
            pass
        elif mtype == 0x46:  # FunctionCall
            self._error(AdminError("0A000", "function calls are not supported by the admin console"))
            self._out.append(RFQ_IDLE)
        elif mtype in (0x50, 0x42, 0x44, 0x45, 0x43):  # Parse, Bind, Describe, Execute, Close
            try:
                self._extended(mtype, body)
            except AdminError as exc:
                self._error(exc)
                self.skipping = True
        else:
            raise ProtocolError(f"invalid frontend message type {mtype}")

    # --- simple query ----------------------------------------------------------------------

    def _query(self, body: bytes) -> None:
        self.client.request_time = time.time()
        sql = D.query_text(body).decode("utf-8", "replace")
        try:
            commands = C.parse_query(sql)
        except AdminError as exc:
            self._error(exc)
            self._out.append(RFQ_IDLE)
            return
        if not commands:
            self._out += (EMPTY_QUERY, RFQ_IDLE)
            return
        self._run_simple(commands, 0)

    def _run_simple(self, commands: list[Command], i: int) -> None:
        while i < len(commands):
            cmd = commands[i]
            i += 1
            try:
                res = self._execute(cmd)
            except AdminError as exc:
                self._error(exc)
                break
            if self._park(res, lambda res=res, i=i: self._resume_simple(res, commands, i)):
                return
            if not self._answer(res, describe=True):
                return
        self._out.append(RFQ_IDLE)

    def _resume_simple(self, res: Result, commands: list[Command], i: int) -> None:
        if self._answer(res, describe=True):
            self._run_simple(commands, i)

    # --- extended query --------------------------------------------------------------------

    def _extended(self, mtype: int, body: bytes) -> None:
        out = self._out
        if mtype == 0x50:  # Parse
            name, sql, _ = D.parse_message(body)
            commands = C.parse_query(sql.decode("utf-8", "replace"))
            if len(commands) > 1:
                raise AdminError("42601", "cannot insert multiple commands into a prepared statement")
            if name and name in self.statements:
                raise AdminError("42P05", f'prepared statement "{_name(name)}" already exists')
            self.statements[name] = commands[0] if commands else None
            out.append(B.PARSE_COMPLETE)
        elif mtype == 0x42:  # Bind
            portal, stmt, nparams, codes = parse_bind(body)
            if stmt not in self.statements:
                raise AdminError("26000", f'prepared statement "{_name(stmt)}" does not exist')
            if nparams:
                raise AdminError(
                    "08P01", f"bind message supplies {nparams} parameters, but prepared statement "
                    f'"{_name(stmt)}" requires 0')
            cmd = self.statements[stmt]
            columns = C.describe(cmd) if cmd is not None else None
            formats = result_formats(codes, len(columns) if columns is not None else 0)
            self.portals[portal] = Portal(cmd, columns, formats)
            out.append(B.BIND_COMPLETE)
        elif mtype == 0x44:  # Describe
            kind, name = D.describe_or_close(body)
            if kind == 0x53:
                if name not in self.statements:
                    raise AdminError("26000", f'prepared statement "{_name(name)}" does not exist')
                cmd = self.statements[name]
                columns = C.describe(cmd) if cmd is not None else None
                out.append(NO_PARAMS)
                out.append(B.NO_DATA if columns is None else row_description(columns, [0] * len(columns)))
            else:
                p = self.portals.get(name)
                if p is None:
                    raise AdminError("34000", f'portal "{_name(name)}" does not exist')
                out.append(B.NO_DATA if p.columns is None else row_description(p.columns, p.formats))
        elif mtype == 0x45:  # Execute
            name, _ = D.read_cstr(body, 0)
            p = self.portals.get(name)
            if p is None:
                raise AdminError("34000", f'portal "{_name(name)}" does not exist')
            self.client.request_time = time.time()
            if p.command is None:
                out.append(EMPTY_QUERY)
                return
            res = self._execute(p.command)
            formats = p.formats

            def finish(res: Result = res) -> None:
                self._answer(res, describe=False, formats=formats)

            if not self._park(res, finish):
                finish()
        else:  # Close
            kind, name = D.describe_or_close(body)
            if kind == 0x53:
                self.statements.pop(name, None)
            else:
                self.portals.pop(name, None)
            out.append(B.CLOSE_COMPLETE)

    # --- running commands ------------------------------------------------------------------

    def _execute(self, cmd: Command) -> Result:
        try:
            return C.execute(self, cmd)
        except AdminError:
            raise
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            log.exception("admin command failed", command=cmd.text)
            raise AdminError("XX000", f"internal error: {exc}") from None

    def _answer(self, res: Result, describe: bool, formats: Sequence[int] | None = None) -> bool:
        """Queue a command's answer; False when the session must say nothing more."""
        if res.silent:
            self.halted = True
        else:
            self._emit(res, describe, formats)
        if res.after is not None:
            self._flush()
            res.after()
        return not self.halted

    def _park(self, res: Result, then: Callable[[], None]) -> bool:
        """If ``res`` must wait, stop reading and run ``then`` once it is done; True if parked."""
        if res.wait is None or res.wait():
            return False
        self._flush()
        self._busy = asyncio.get_running_loop().create_task(self._wait(res, then))
        return True

    async def _wait(self, res: Result, then: Callable[[], None]) -> None:
        assert res.wait is not None
        client = self.client
        try:
            while not client.closed and not res.wait():
                await asyncio.sleep(POLL_INTERVAL)
        finally:
            self._busy = None
        if client.closed:
            return
        try:
            then()
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("admin command failed after waiting")
            self._out.clear()
            client.fatal("XX000", "internal error in the admin console")
            return
        self.process()
