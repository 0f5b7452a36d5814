"""The seam where the TVIEW engine plugs into a client session.

A session calls its ``tview`` hooks (when the engine is enabled; ``None`` otherwise, so the
hot path pays one attribute test).  Hooks that return batches (``list[bytes]``) ask the session
to send them to the server first, each ending in exactly one ReadyForQuery; their replies go to
``injected`` instead of the client, and a batch's error stands in for the outcome of the
client's next request (a refresh that fails fails the COMMIT) unless ``injected`` returns True
(the engine's own affair, e.g. an audit statement in an aborted transaction).

- ``query(session, text)`` for every simple Query, ``parse(session, name, text)`` for every
  Parse, ``bind(session, name, body, pos)`` for a Bind of a statement that writes a tracked table
  or is an opaque writer.
- ``ddl(session, text)``: True when the engine answers the Query itself (TVIEW DDL); it then
  calls ``session.ddl_done(replies)``.
- ``ready(session, status)`` at a client-bound ReadyForQuery with nothing outstanding: batches
  returned close a transaction the proxy opened; the client's ReadyForQuery waits for them.
- ``hold_ready(session, status)`` right after ``ready`` returned nothing: True when the engine
  sends that ReadyForQuery itself later, through ``session.ddl_done`` (after DDL that changes
  what it audits, once the catalog is reloaded).
- ``wrapped`` / ``hold``: the proxy opened the current transaction; hold the client's further
  input until it is closed (not while COPY data must flow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession


class TransactionHooks(Protocol):
    wrapped: bool
    hold: bool
    stmts: dict[bytes, object]

    def query(self, session: ClientSession, text: bytes) -> list[bytes] | None: ...

    def parse(self, session: ClientSession, name: bytes, text: bytes) -> list[bytes] | None: ...

    def bind(self, session: ClientSession, name: bytes, body: bytes,
             pos: int) -> list[bytes] | None: ...

    def ddl(self, session: ClientSession, text: bytes) -> bool: ...

    def ready(self, session: ClientSession, status: bytes) -> list[bytes] | None: ...

    def hold_ready(self, session: ClientSession, status: bytes) -> bool: ...

    def injected(self, rows: list[list[bytes | None]], error: dict[str, str] | None) -> bool: ...
