"""The seam where the TVIEW engine plugs into a client session.

A session calls its ``tview`` hooks (when the engine is enabled; ``None`` otherwise, so the
hot path pays one attribute test) only while ``db.active`` (the database has TVIEWs, read from
its current catalog at each message) or while the engine has state of its own in the session
(``wrapped``, ``reload_after``, recorded ``stmts``/``rewritten``; a Query naming ``tv_`` still
goes to ``ddl``: the first TVIEW is made that way).  Hooks that return batches (``list[bytes]``) ask the session
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
- ``close_now(session)`` right after the message that ends such a transaction (the Query, or
  the Sync of an extended batch) is written: batches (refresh plan, COMMIT) to send behind it
  in the same round trip, or None (keys still to come back: closed at ``ready`` instead).  The
  session then swallows the ReadyForQuery of the client's request and answers the one of the
  COMMIT (with the plan's error, if any).
- ``implicit``: the proxy took charge of an extended batch's implicit transaction without a
  BEGIN.  At the client's Sync, ``close_implicit(session)`` gives the plan to send *instead*
  of that Sync (it ends in its own; ``[]``: send the client's Sync as it is), or None: then
  ``upgrade_at_sync()`` gives a BEGIN (and how many replies of it to swallow) to send before the Sync, and
  the transaction is closed at ``ready`` like any other block the proxy opened.  When the
  server already failed a statement of the batch (it skips up to that Sync),
  ``abandon_implicit()`` instead, and the Sync goes as it is.
- ``convert_query`` after ``query``: the session sends that Query's text as an unnamed
  Parse/Bind/Execute (no Describe: it returns no rows) and closes it as an implicit batch.

Appended RETURNING (tview/returning.py, keys the statement text does not name):

- after ``query``, ``ret_query`` is the rewrite to send instead of the Query (the session takes
  it and sets it back to None); after ``parse``, ``parse_returning(session, name, text)`` gives
  the statement text to prepare instead (or None).  ``rewritten`` (statement name -> rewrite)
  and ``portals`` (portal name -> rewrite) say which Binds, Describes and Executes concern one:
  a Bind of a rewritten statement goes through ``bind_returning`` (batches to run first, and the
  Bind body to send), any other Bind drops its portal from ``portals``.
- ``expect_returning(rewrite, kind, describe)`` makes the expectation (a :class:`StripReply`)
  pushed for such a Query, Describe or Execute; its RowDescription/DataRow replies are stripped
  by the session, the appended values go to ``returned``, and ``returning_done`` (at
  CommandComplete or PortalSuspended) / ``returning_described`` close it.  ``ret_live`` is
  non-empty while any may still be outstanding: only then does the reply path look for them.
- ``may_track(session, text)``: the statement may write a tracked table (a Parse of it is not
  answered without a server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession


class StripReply(int):
    """An expectation of the session (``EXP_QUERY`` or ``EXP_EXT``: it compares equal to its kind
    wherever the session matches replies) whose replies lose the appended RETURNING columns.
    Attributes are set by the engine: ``rewrite``, ``describe`` and the keys collected."""


class TviewDatabaseState(Protocol):
    active: bool  # the database has TVIEWs: else the session does not call the engine


class TransactionHooks(Protocol):
    db: TviewDatabaseState
    reload_after: bool
    wrapped: bool
    implicit: bool
    convert_query: bool
    hold: bool
    stmts: dict[bytes, object]
    rewritten: dict[bytes, object]
    portals: dict[bytes, object]
    ret_query: object | None
    ret_live: list[StripReply]

    def query(self, session: ClientSession, text: bytes) -> list[bytes] | None: ...

    def parse(self, session: ClientSession, name: bytes, text: bytes) -> list[bytes] | None: ...

    def bind(self, session: ClientSession, name: bytes, body: bytes,
             pos: int) -> list[bytes] | None: ...

    def ddl(self, session: ClientSession, text: bytes) -> bool: ...

    def ready(self, session: ClientSession, status: bytes) -> list[bytes] | None: ...

    def close_now(self, session: ClientSession) -> list[bytes] | None: ...

    def close_implicit(self, session: ClientSession) -> list[bytes] | None: ...

    def upgrade_at_sync(self) -> tuple[bytes, int]: ...

    def abandon_implicit(self) -> None: ...

    def hold_ready(self, session: ClientSession, status: bytes) -> bool: ...

    def injected(self, raw: list[bytes], error: dict[str, str] | None) -> bool: ...

    def parse_returning(self, session: ClientSession, name: bytes,
                        text: bytes) -> bytes | None: ...

    def bind_returning(self, session: ClientSession, portal: bytes, name: bytes, body: bytes,
                       pos: int) -> tuple[list[bytes] | None, bytes]: ...

    def expect_returning(self, rewrite: object, kind: int, describe: bool) -> StripReply: ...

    def returned(self, head: StripReply, values: list[bytes | None]) -> None: ...

    def returned_key(self, head: StripReply, raw: bytes) -> None: ...

    def returning_done(self, head: StripReply, complete: bool) -> None: ...

    def returning_described(self, head: StripReply) -> None: ...

    def may_track(self, session: ClientSession, text: bytes) -> bool: ...
