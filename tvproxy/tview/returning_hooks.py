"""Engine glue for appended RETURNING: the part of :class:`TviewSession` that rewrites writes
whose keys the text does not name, and collects the keys from the stripped replies.

Life of such a statement (rewrite in tview/returning.py, stripping in protocol/strip.py):

1. Query or Parse: :meth:`ReturningHooks._returning_rewrite` decides; the tracker is not told
   ``ALL_KEYS`` for the statement's own keys (only for what stays unknown: ``all_keys`` of the
   rewrite, and full-strategy TVIEWs as before).
2. The Query, or each Execute of a portal bound to the statement, is expected as a
   :class:`StripReply` (Describes too, to answer without the appended columns).  Its DataRows
   hand their appended values to :meth:`returned`, collected on the expectation.
3. At CommandComplete (:meth:`returning_done`) the keys go to the tracker, on the level the
   transaction is at then.  A failed statement's keys are never recorded (it wrote nothing).

Race: keys arrive with the replies, but plans are made when the client's messages are sent.
When a plan point (COMMIT, PREPARE TRANSACTION, a read of a tv_ table) or a SAVEPOINT is sent
while a rewritten statement of the transaction is still in flight, its entities get
``ALL_KEYS`` there and then (what the engine did before rewriting), and its late keys are
dropped.  Autocommit statements are closed at their ReadyForQuery, after every reply.  A portal
suspended by a row limit (the statement ran to completion, its rows are not all read) counts as
unknown keys too.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from tvproxy.protocol.strip import extend_result_formats
from tvproxy.session.hooks import StripReply
from tvproxy.tview.capture import WriteCapture
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.planner import ALL_KEYS
from tvproxy.tview.returning import INTEGER_TYPES, ReturningRewrite, key_value, rewrite_returning
from tvproxy.tview.statement import Kind, Statement

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession

# one statement returning more keys than this refreshes its TVIEWs fully (memory bound)
MAX_RETURNED_KEYS = 100_000
_UTF8 = frozenset({"UTF8", "UTF-8", "UNICODE"})


class ReturningHooks:
    """Mixed into TviewSession (which provides engine, client, tracker, stmts, started,
    ``_wrap`` and ``_send``)."""

    engine: Any
    client: ClientSession
    tracker: Any
    stmts: dict[bytes, Any]  # name -> session_capture.Prepared
    started: float
    span: dict[str, int] | None  # the opaque-writes audit's allowances (engine.py)
    failed: bool
    inflight: list[object]

    def _init_returning(self) -> None:
        self.rewritten: dict[bytes, ReturningRewrite] = {}  # statement name -> rewrite
        self.portals: dict[bytes, ReturningRewrite] = {}  # portal name -> rewrite
        self.ret_query: ReturningRewrite | None = None  # rewrite of the Query just seen
        self.ret_live: list[StripReply] = []  # expectations that may still be outstanding

    # --- deciding ---------------------------------------------------------------------------

    @staticmethod
    def _plain_text(client: ClientSession, text: bytes) -> str | None:
        """The statement as text the rewrite may print back, or None (it may not)."""
        params = client.params
        server = client.server.params if client.server is not None else {}

        def setting(key: str) -> str | None:
            return params.get(key) or server.get(key)

        if (setting("standard_conforming_strings") or "on") != "on":
            return None  # pglast reads string literals as PostgreSQL does with it on
        if text.isascii():
            return text.decode()
        if (setting("client_encoding") or "").upper() not in _UTF8:
            return None
        try:
            return text.decode()
        except UnicodeDecodeError:
            return None

    def _returning_rewrite(self, client: ClientSession, text: bytes,
                           writes: tuple[WriteCapture, ...],
                           cat: RuntimeCatalog) -> ReturningRewrite | None:
        if len(writes) != 1:
            return None
        w = writes[0]
        if w.op not in ("insert", "update", "delete"):
            return None
        pg18 = cat.server_version >= 18
        if w.keys is not None and not any(k.array for k in w.keys):
            # keys from the text or from bound parameters; on PostgreSQL 18 old values come
            # back too, instead of a pre-image or of refreshing every row for a new pk
            moves = bool(cat.aggregated_into.get(w.entity)) and (
                w.op == "delete" or w.assigns_key_columns)
            if not pg18 or not (moves or w.assigns_pk):
                return None
        table = next((t for t in cat.tracked if t.name == w.table), None)
        if table is None:
            return None
        sql = self._plain_text(client, text)
        if sql is None:
            return None
        return rewrite_returning(sql, table, cat.aggregations.get(w.entity, ()), pg18)

    def _touch_returning(self, cat: RuntimeCatalog, w: WriteCapture,
                         rw: ReturningRewrite) -> None:
        """What is known when a rewritten statement is sent: only what stays unknown."""
        tracker = self.tracker
        if self.span is not None:  # the audit may see any number of rows written
            self.span[cat.audit_name.get(w.table, w.table)] = -1
        for e in rw.all_keys:
            tracker.touch(e, [ALL_KEYS])
        for e in cat.full_on.get(w.entity, ()):
            tracker.touch(e, [ALL_KEYS])
        tracker.statement_succeeded()
        if not self.started:
            self.started = time.monotonic()

    # --- extended protocol ------------------------------------------------------------------

    def parse_returning(self, client: ClientSession, name: bytes, text: bytes) -> bytes | None:
        """After ``parse``: the statement text to prepare instead of ``text``, or None."""
        prepared = self.stmts.get(name)
        writes = prepared.statement.writes if prepared is not None else ()
        rw = None
        if writes and prepared is not None and prepared.fast is None:  # (one key: never)
            cat = self.engine.catalog(client.database)
            if not cat.empty:
                rw = self._returning_rewrite(client, text, writes, cat)
        if rw is None:
            if self.rewritten:
                self.rewritten.pop(name, None)
            return None
        self.rewritten[name] = rw
        return rw.sql.encode()

    def bind_returning(self, client: ClientSession, portal: bytes, name: bytes, body: bytes,
                       pos: int) -> tuple[list[bytes] | None, bytes]:
        """A Bind of a rewritten statement: (batches to run first, the Bind body to send)."""
        rw = self.rewritten[name]
        cat = self.engine.catalog(client.database)
        prepared = self.stmts.get(name)
        pre: list[tuple[bytes, object]] = []
        writes: tuple[WriteCapture, ...] = ()
        if prepared is not None:  # a named one's effects happen now
            writes = self._prepared(prepared, pre, cat).writes  # type: ignore[attr-defined]
        for w in writes:
            self._touch_returning(cat, w, rw)
        if name:
            self._wrap(pre)  # type: ignore[attr-defined]
        self.portals[portal] = rw
        try:
            body = extend_result_formats(body, pos, rw.n_extra)
        except Exception:  # noqa: BLE001 - a malformed Bind: the server rejects it itself
            pass
        return self._send(pre), body  # type: ignore[attr-defined]

    # --- replies ----------------------------------------------------------------------------

    def expect_returning(self, rewrite: ReturningRewrite, kind: int,
                         describe: bool) -> StripReply:
        head = StripReply(kind)
        head.rewrite = rewrite  # type: ignore[attr-defined]
        head.describe = describe  # type: ignore[attr-defined]
        head.keys = {}  # type: ignore[attr-defined]
        head.abandoned = False  # type: ignore[attr-defined]
        head.generation = self.tracker.generation  # type: ignore[attr-defined]
        types = self.engine.catalog(self.client.database).key_types
        head.integer = tuple(  # type: ignore[attr-defined]
            types.get(c.entity, "text") in INTEGER_TYPES for c in rewrite.columns)
        if self.ret_live:
            self._prune()
        self.ret_live.append(head)
        return head

    def _prune(self) -> None:
        expect = self.client.expect
        self.ret_live = [s for s in self.ret_live if any(s is e for e in expect)]

    def returned(self, head: StripReply, values: list[bytes | None]) -> None:
        for col, integer, raw in zip(head.rewrite.columns, head.integer,  # type: ignore[attr-defined]
                                     values, strict=True):
            if raw is not None:
                self._returned(head, col.entity, integer, raw)

    def returned_key(self, head: StripReply, raw: bytes) -> None:
        """The one appended value of a row whose statement returns nothing of its own (the
        common case: a row's key, read from the DataRow without splitting it)."""
        self._returned(head, head.rewrite.columns[0].entity,  # type: ignore[attr-defined]
                       head.integer[0], raw)  # type: ignore[attr-defined]

    @staticmethod
    def _returned(head: StripReply, entity: str, integer: bool, raw: bytes) -> None:
        keys: dict[str, set[Hashable]] = head.keys  # type: ignore[attr-defined]
        got = keys.get(entity)
        if got is None:
            got = keys[entity] = set()
        elif ALL_KEYS in got:
            return
        try:
            got.add(key_value(raw, integer))
        except (ValueError, UnicodeDecodeError):
            keys[entity] = {ALL_KEYS}
            return
        if len(got) > MAX_RETURNED_KEYS:
            keys[entity] = {ALL_KEYS}

    def _forget(self, head: StripReply) -> None:
        live = self.ret_live
        for i, s in enumerate(live):
            if s is head:
                del live[i]
                return

    def returning_done(self, head: StripReply, complete: bool) -> None:
        """CommandComplete (``complete``) or PortalSuspended of a rewritten statement."""
        self._forget(head)
        keys: dict[str, set[Hashable]] = head.keys  # type: ignore[attr-defined]
        head.keys = {}  # type: ignore[attr-defined]
        if head.abandoned or head.generation != self.tracker.generation:  # type: ignore[attr-defined]
            return  # a plan point already counted it as unknown, or its transaction is over
        tracker = self.tracker
        if complete:
            for entity, pks in keys.items():
                tracker.touch(entity, pks)
        else:  # rows left in the portal: their keys may never be read
            for entity in head.rewrite.entities:  # type: ignore[attr-defined]
                tracker.touch(entity, [ALL_KEYS])
        tracker.statement_succeeded()

    def returning_described(self, head: StripReply) -> None:
        self._forget(head)

    def _returning_plan_point(self, st: Statement, cat: RuntimeCatalog) -> None:
        """Before a statement is recorded: if it makes a plan (or a savepoint) while rewritten
        statements (or pre-images of old parents) are in flight, their keys are unknown from
        here on."""
        if self.ret_live:
            self._prune()
        flying = [s for s in self.ret_live
                  if not s.describe and not s.abandoned]  # type: ignore[attr-defined]
        parents = [m for m in self.inflight if isinstance(m, str)]
        if not flying and not parents:
            return
        if not st.kind & Kind.TX and not (self.engine.cfg.read_your_writes
                                           and st.kind & Kind.READS_TV):
            return
        tracker = self.tracker
        for s in flying:
            for entity in s.rewrite.entities:  # type: ignore[attr-defined]
                tracker.touch(entity, [ALL_KEYS])
            s.abandoned = True  # type: ignore[attr-defined]
        for parent in parents:
            tracker.touch(parent, [ALL_KEYS])
        tracker.statement_succeeded()
