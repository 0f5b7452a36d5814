"""The seam where the TVIEW engine plugs into a client session.

A session calls its ``tview`` hooks (when the engine is enabled; ``None`` otherwise, so the
hot path pays one attribute test):

- ``statement(session, text)`` for every Query text and named/unnamed Parse text the client sends,
  before it is forwarded. It returns SQL the proxy must run first on the same server, in the
  same transaction (the refresh plan before a COMMIT / PREPARE TRANSACTION), or ``None``.
  The replies to that SQL are swallowed (the engine turns its failures into the COMMIT's error
  by the SQL it writes, e.g. a plan that aborts the transaction).
- ``transaction_ended(session, status)`` at each ReadyForQuery the client receives; status
  ``b"I"`` means the transaction (explicit or implicit) is over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession


class TransactionHooks(Protocol):
    def statement(self, session: ClientSession, text: bytes) -> str | None: ...

    def transaction_ended(self, session: ClientSession, status: bytes) -> None: ...
