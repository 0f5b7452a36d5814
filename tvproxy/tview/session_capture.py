"""Engine glue for what a client's statements do: the part of :class:`TviewSession` that takes
each statement text (Query, Parse, Bind) through one analysis (tview/statement.py) and records
its effects: transaction control, tracked keys, the opaque-writes audit, read-your-writes, and
the end of implicit transactions in one round trip (:meth:`CaptureHooks.close_now`).  The
common write of an OLTP transaction, one key of one entity named by a parameter or a literal,
is recorded straight into the tracker inside a block (:class:`FastBind`), without the rest.

Per-database state shared by the sessions: :class:`TviewDatabase` (the current catalog, whether
it has TVIEWs at all, its analyzer), kept by :class:`CatalogMap` (the engine's ``catalogs``):
a session reads ``db.active`` (one attribute) to know whether the engine has anything to do.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tvproxy.log import get_logger
from tvproxy.protocol import build as B
from tvproxy.tview.bound import FastBind, bound_keys, fast_bind, only_key
from tvproxy.tview.capture import WriteCapture
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.opaque import baseline_sql, close_sql
from tvproxy.tview.planner import ALL_KEYS
from tvproxy.tview.statement import Analyzer, Kind, Statement
from tvproxy.tview.twophase import PERSISTED, encode_keys, insert_sql
from tvproxy.tview.txcontrol import TxKind

if TYPE_CHECKING:
    from tvproxy.session.client import ClientSession

log = get_logger("tvproxy.tview")
EMPTY = RuntimeCatalog()
_ROLLBACKS = (TxKind.ROLLBACK, TxKind.ROLLBACK_AND_CHAIN, TxKind.ROLLBACK_TO)
_MATTERS = Kind.TX | Kind.WRITE | Kind.OPAQUE | Kind.READS_TV | Kind.RELOAD


class TviewDatabase:
    """One database as the sessions see it: its current catalog and analyzer."""

    __slots__ = ("_analyzer", "active", "catalog", "name")

    def __init__(self, name: str, catalog: RuntimeCatalog) -> None:
        self.name = name
        self.catalog = catalog
        self.active = not catalog.empty  # any TVIEW at all: else sessions skip the engine
        self._analyzer: Analyzer | None = None

    def set(self, catalog: RuntimeCatalog) -> None:
        self.catalog = catalog
        self.active = not catalog.empty

    @property
    def analyzer(self) -> Analyzer:
        """The analyzer of the current catalog (a new catalog: a new one, empty caches)."""
        an = self._analyzer
        if an is None or an.catalog is not self.catalog:
            an = self._analyzer = Analyzer(self.catalog)
        return an


class CatalogMap(dict[str, RuntimeCatalog]):
    """The engine's catalogs by database; assigning one updates its :class:`TviewDatabase`."""

    def __init__(self) -> None:
        super().__init__()
        self.databases: dict[str, TviewDatabase] = {}

    def __setitem__(self, name: str, catalog: RuntimeCatalog) -> None:
        super().__setitem__(name, catalog)
        self.database(name).set(catalog)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self.database(name).set(EMPTY)

    def database(self, name: str) -> TviewDatabase:
        db = self.databases.get(name)
        if db is None:
            db = self.databases[name] = TviewDatabase(name, self.get(name, EMPTY))
        return db


def statement_messages(statements: tuple[str, ...] | list[str],
                       all_params: tuple[tuple[object, ...], ...] | list[tuple[object, ...]]
                       ) -> bytes:
    """Unnamed Parse/Bind/Execute per statement (no Sync), text parameters."""
    out = []
    for sql, params in zip(statements, all_params, strict=True):
        out.append(B.parse(b"", sql.encode()))
        out.append(B.bind(b"", [B.text_value(p) for p in params]))
        out.append(B.execute())
    return b"".join(out)


def all_affected(cat: RuntimeCatalog, entity: str) -> list[str]:
    """Entities to refresh fully when every row of ``entity`` may have changed: itself, the
    TVIEWs aggregating it (old parents unknown) and those refreshed fully on it."""
    return [entity, *cat.aggregated_into.get(entity, ()), *cat.full_on.get(entity, ())]


def preimage_batch(sql: str, keys: list[Hashable]) -> bytes:
    """A SELECT of parent keys, on a named statement so a client's unnamed one survives."""
    name = b"tvproxy_preimage"
    return (B.parse(name, sql.encode()) + B.bind(name, [B.text_value(list(keys))])
            + B.execute() + B.close_statement(name) + B.SYNC)


@dataclass(frozen=True)
class Audit:
    """An injected batch of the opaque-writes audit (tview/opaque.py)."""

    tables: tuple[str, ...] = ()  # for a comparison: the tables, in the order sent
    close: bool = False
    txn: int = 0  # the client's transaction it belongs to


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement the client prepared that concerns the engine."""

    sql: str
    statement: Statement
    analyzer: Analyzer  # the analysis is of that catalog's analyzer
    deferred: bool  # named: effects at every Bind, not at the Parse
    fast: FastBind | None = None


@dataclass(frozen=True)
class Closing:
    """The refresh plan that closes an implicit transaction sent in one round trip with the
    client's statement: a 25P02 says the client's statement failed first (it saw that error;
    the plan's is nobody's concern)."""

    meta: object


class CaptureHooks:
    """Mixed into TviewSession (engine.py), which provides the state and ``_plan_batch``,
    ``_end_transaction`` and the returning hooks."""

    engine: Any
    client: ClientSession
    db: TviewDatabase
    cat: RuntimeCatalog | None
    tracker: Any
    in_block: bool
    wrapped: bool
    implicit: bool
    convert_query: bool
    hold: bool
    stmts: dict[bytes, Prepared]
    inflight: list[object]
    started: float
    failed: bool
    span: dict[str, int] | None
    audits_inflight: int
    opaque_tables: list[str]
    reload_after: bool
    committed_prepared: list[str]
    txn: int
    ret_live: list[Any]
    ret_query: Any

    # --- the catalog ----------------------------------------------------------------------

    def _catalog(self) -> RuntimeCatalog:
        """The current catalog; when it is the first with TVIEWs this session sees, the
        transaction state is taken from the server (ReadyForQuery was not followed before)."""
        cat = self.db.catalog
        if cat is not self.cat:
            if self.cat is None or self.cat.empty:
                server = self.client.server
                status = server.status if server is not None else b"I"
                self.in_block = status != b"I"
                self.failed = status == b"E"
            self.cat = cat
        return cat

    def _wrap(self, pre: list[tuple[bytes, object]], implicit: bool = False) -> None:
        """The proxy takes charge of closing the client's implicit transaction.  ``implicit``
        (extended protocol): PostgreSQL's own implicit transaction of the batch is kept, and
        the plan goes in before the client's Sync (:meth:`close_implicit`); otherwise, or as
        soon as something must run inside it in a batch of its own, a BEGIN opens a block."""
        if not self.in_block and not self.wrapped:
            self.wrapped = True
            if implicit:
                self.implicit = True
            else:
                pre.insert(0, (B.query("BEGIN"), None))

    def _upgrade(self, pre: list[tuple[bytes, object]], query: bool = False) -> None:
        """The implicit transaction becomes a block: the BEGIN runs inside it (PostgreSQL then
        keeps what the batch did so far), ahead of a batch of the engine that ends in a Sync,
        or as a Query of its own ahead of the client's Query (``query``)."""
        self.implicit = False
        if query or not pre:
            pre.insert(0, (B.query("BEGIN"), None))
        else:
            batch, meta = pre[0]
            pre[0] = (BEGIN_IN_BATCH + batch, meta)

    def _send(self, pre: list[tuple[bytes, object]]) -> list[bytes] | None:
        """Batches to run, in order; what each one is for waits in ``inflight``."""
        if not pre:
            return None
        if self.implicit:  # a Sync of the engine's inside the client's implicit transaction
            self._upgrade(pre)
        self.inflight.extend(meta for _, meta in pre)
        return [batch for batch, _ in pre]

    # --- recording keys -------------------------------------------------------------------

    def _only_records(self) -> bool:
        """Nothing but recording a one-key write can happen now: no audit span open, no keys
        still on their way (appended RETURNING, pre-images, injected batches)."""
        return self.span is None and not self.ret_live and not self.inflight

    def _record(self, entity: str, key: Hashable) -> None:
        """A one-key write (:func:`~tvproxy.tview.bound.only_key`) in the tracker."""
        self.tracker.record(entity, (key,))
        if not self.started:
            self.started = time.monotonic()

    def _touch(self, cat: RuntimeCatalog, w: WriteCapture, keys: list[Hashable] | None,
               pre: list[tuple[bytes, object]]) -> None:
        tracker = self.tracker
        if self.span is not None:  # what the counters may show for this captured write
            name = cat.audit_name.get(w.table, w.table)
            n = -1 if keys is None or self.span.get(name, 0) < 0 else len(keys)
            self.span[name] = -1 if n < 0 else self.span.get(name, 0) + n
        # an upsert's DO UPDATE moves children too
        old_values_needed = w.op not in ("insert", "update") or w.assigns_key_columns
        parents = cat.aggregated_into.get(w.entity, ())
        full_on = cat.full_on.get(w.entity, ())
        written = keys if keys is not None else [ALL_KEYS]
        # keys count from the moment the statement is sent: a statement that fails costs at
        # most a refresh that finds nothing changed
        if not (parents and old_values_needed) and not full_on and not (
                w.assigns_pk and keys is not None):  # only the keys written: the common case
            tracker.record(w.entity, written)
        else:
            tracker.touch(w.entity, written)
            if parents and old_values_needed:
                if keys is None:
                    for parent in parents:
                        tracker.touch(parent, [ALL_KEYS])
                else:  # the children's parents before the statement changes them
                    for parent, sql in cat.preimage.get(w.entity, ()):
                        pre.append((preimage_batch(sql, keys), parent))
            for e in full_on:
                tracker.touch(e, [ALL_KEYS])
            if w.assigns_pk and keys is not None:
                tracker.touch(w.entity, [ALL_KEYS])  # the new pk is not in the statement
            tracker.statement_succeeded()
        if not self.started:
            self.started = time.monotonic()

    # --- one statement --------------------------------------------------------------------

    def _statement(self, st: Statement, pre: list[tuple[bytes, object]],
                   cat: RuntimeCatalog) -> None:
        """What every statement goes through (Query, Parse, Bind of a named one): flush for
        reads of tv_ tables, the opaque-writes audit, transaction control."""
        if self.ret_live or self.inflight:  # keys that have not all arrived yet
            self._returning_plan_point(st, cat)  # type: ignore[attr-defined]
        if st.kind & Kind.READS_TV:
            self._read_your_writes(pre, cat)
        opaque = self._audit(st, pre, cat)
        if st.kind & Kind.TX:
            self._tx_commands(st, pre, cat)
        if opaque:
            self._wrap(pre)  # its writes are compared before the proxy's COMMIT
        if st.kind & Kind.RELOAD:
            self.reload_after = True  # a new trigger, function or foreign key changes the audit

    def _tx_commands(self, st: Statement, pre: list[tuple[bytes, object]],
                     cat: RuntimeCatalog) -> None:
        for cmd in st.tx:
            kind = cmd.kind
            if kind is TxKind.BEGIN:
                self.in_block = True
            elif kind in (TxKind.COMMIT, TxKind.COMMIT_AND_CHAIN, TxKind.PREPARE):
                if not self.failed:  # COMMIT of a failed transaction refreshes nothing
                    self._close_span(pre, cat)
                    keys = self.with_new_tviews(cat, self.tracker.take())  # type: ignore[attr-defined]
                    self._plan_batch(pre, cat, keys, False)  # type: ignore[attr-defined]
                    if kind is TxKind.PREPARE and cmd.name and (keys or self.audits_inflight):
                        self._persist_queue(pre, cat, cmd.name, keys)
                self._end_transaction()  # type: ignore[attr-defined]
                self.in_block = kind is TxKind.COMMIT_AND_CHAIN
            elif kind in (TxKind.ROLLBACK, TxKind.ROLLBACK_AND_CHAIN):
                self._end_transaction()  # type: ignore[attr-defined]
                self.in_block = kind is TxKind.ROLLBACK_AND_CHAIN
            elif kind is TxKind.COMMIT_PREPARED and cmd.name:
                self.committed_prepared.append(cmd.name)
            elif kind is TxKind.SAVEPOINT and cmd.name:
                self.tracker.savepoint(cmd.name)
            elif kind is TxKind.RELEASE and cmd.name:
                self.tracker.release(cmd.name)
            elif kind is TxKind.ROLLBACK_TO and cmd.name:
                self.tracker.rollback_to(cmd.name)
                self.span = None  # it opened after the last SAVEPOINT: all of it is undone
                self.failed = False

    def _read_your_writes(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        if not self.engine.cfg.read_your_writes or not self.in_block and not self.wrapped:
            return
        self._close_span(pre, cat)
        if not self.tracker.pending() and not self.audits_inflight:
            return
        self._plan_batch(pre, cat, self.tracker.flush(), True)  # type: ignore[attr-defined]

    def _persist_queue(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog, gid: str,
                       keys: dict[str, set[Hashable]]) -> None:
        """PREPARE TRANSACTION: the queue goes into pending_refresh, in the same transaction,
        for the catch-up after COMMIT PREPARED (tview/twophase.py)."""
        everything = [e for ent in cat.audited.values() for e in all_affected(cat, ent)] if (
            self.audits_inflight) else []
        params = (gid, self.client.database, encode_keys(keys, everything))
        PERSISTED.record(*params)  # SHOW TVIEW PENDING: keys of queues still prepared
        pre.append((statement_messages([insert_sql(self.engine.cfg.schema)], [params]) + B.SYNC,
                    None))

    # --- opaque writers -------------------------------------------------------------------

    def _audit(self, st: Statement, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> bool:
        """Open an audit span before an opaque statement, close it before any other one."""
        if not cat.audited or self.failed:
            return False
        if st.kind & Kind.OPAQUE:
            self._open_span(pre, cat)
            return True
        if self.span is not None and any(c.kind in _ROLLBACKS for c in st.tx):
            self.span = None  # undone with the transaction or savepoint: nothing to compare
        self._close_span(pre, cat)
        return False

    def _open_span(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        if self.span is not None:
            return
        self.span = {}
        names = list(cat.audited)
        pre.append((statement_messages([baseline_sql()], [(names,)]) + B.SYNC, Audit()))
        if not self.started:
            self.started = time.monotonic()

    def _close_span(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        span = self.span
        if span is None:
            return
        self.span = None
        names = tuple(cat.audited)
        allow = [span.get(n, 0) for n in names]
        pre.append((statement_messages([close_sql()], [(list(names), allow)]) + B.SYNC,
                    Audit(names, True, self.txn)))
        self.audits_inflight += 1

    def _opaque_found(self, cat: RuntimeCatalog, tables: list[str]) -> None:
        """The comparison's answer: these tables were written behind the statements' backs."""
        for name in tables:
            entity = cat.audited.get(name)
            if entity is None:
                continue
            if name not in self.opaque_tables:
                self.opaque_tables.append(name)
            for e in all_affected(cat, entity):
                self.tracker.touch(e, [ALL_KEYS])
            self.engine.stat(self.client.database, entity).opaque_writes += 1
        self.tracker.statement_succeeded()
        log.info("tview opaque writes", client=self.client.id, database=self.client.database,
                 tables=tables, policy=self.engine.cfg.opaque_writes)

    # --- the session's events -------------------------------------------------------------

    def query(self, client: ClientSession, text: bytes) -> list[bytes] | None:
        """A simple Query: returns the messages to run first (each ending in one
        ReadyForQuery), or None."""
        pre: list[tuple[bytes, object]] = []
        if self.implicit:  # a Query would end the implicit transaction of the batch
            self._upgrade(pre, query=True)
        cat = self._catalog()
        if cat.empty:
            return self._send(pre)
        st = self.db.analyzer.analyze(text.decode("utf-8", "replace"))
        self.hold = True
        if not st.kind and self.span is None:
            return self._send(pre)  # nothing the engine follows (and no audit to close first)
        if self.in_block and not pre and self._only_records():
            ref = only_key(st, cat)
            if ref is not None and ref.param is None:
                # one key of one entity written inside a block: all that happens is its record
                self._record(st.writes[0].entity, ref.value)
                return None
        self._statement(st, pre, cat)
        writes = st.writes
        if not writes:
            return self._send(pre)
        self.hold = not any(w.op == "copy" for w in writes)  # COPY data must still flow
        rw = self.ret_query = self._returning_rewrite(  # type: ignore[attr-defined]
            client, text, writes, cat)
        for w in writes:
            if rw is not None:  # keys come back in the appended RETURNING
                self._touch_returning(cat, w, rw)  # type: ignore[attr-defined]
                continue
            keys = None if w.keys is None or any(k.param is not None for k in w.keys) else [
                k.value for k in w.keys]
            self._touch(cat, w, keys, pre)
        if (rw is None and self.hold and not pre and not self.in_block and not self.wrapped
                and len(st.commands) == 1 and not st.kind & (Kind.TX | Kind.OPAQUE)
                and self.span is None and not any(w.has_returning for w in writes)):
            # one autocommit write with its keys known and no rows to return: the session
            # runs it as an unnamed extended statement, the plan closes its implicit
            # transaction (no BEGIN, no COMMIT)
            self._wrap(pre, True)
            self.convert_query = True
        else:
            self._wrap(pre)
        return self._send(pre)

    def parse(self, client: ClientSession, name: bytes, text: bytes) -> list[bytes] | None:
        """An unnamed statement runs right after its Parse: its effects happen now.  A named
        one may run many times, on any server: recorded here, its effects happen at each Bind
        (also when the proxy answered the Parse itself)."""
        cat = self._catalog()
        if cat.empty:
            self.stmts.pop(name, None)
            return None
        sql = text.decode("utf-8", "replace")
        an = self.db.analyzer
        st = an.analyze(sql)
        if not name:
            last = self.stmts.get(b"")
            if (last is not None and last.statement is st and last.fast is not None
                    and last.analyzer is an and (self.in_block or self.wrapped)
                    and self._only_records()):
                # the same one-key write again (its texts may differ in literals that hold
                # no key): what it does comes at its Bind
                self.stmts[b""] = Prepared(sql, st, an, False, last.fast)
                return None
        if not st.kind & _MATTERS:
            self.stmts.pop(name, None)
            return None
        if name:
            self.stmts[name] = Prepared(sql, st, an, True, fast_bind(st, an.catalog))
            return None
        pre: list[tuple[bytes, object]] = []
        self._statement(st, pre, cat)
        if st.writes or st.kind & Kind.OPAQUE:
            self.stmts[name] = Prepared(sql, st, an, False, fast_bind(st, an.catalog))
            self._wrap(pre, True)  # before the Parse: a Query in between would drop it
        else:
            self.stmts.pop(name, None)
        return self._send(pre)

    def _prepared(self, prepared: Prepared, pre: list[tuple[bytes, object]],
                  cat: RuntimeCatalog) -> Statement:
        """A Bind of a recorded statement: a named one's effects happen now, each time."""
        st = prepared.statement
        if prepared.deferred:
            an = self.db.analyzer
            if prepared.analyzer is not an:  # the catalog changed since the Parse
                st = an.analyze(prepared.sql)
            self._statement(st, pre, cat)
        elif st.kind & Kind.OPAQUE and not self.failed:
            self._open_span(pre, cat)
        return st

    def bind(self, client: ClientSession, name: bytes, body: bytes, pos: int) -> list[bytes] | None:
        prepared = self.stmts.get(name)
        if prepared is None:
            return None
        fast = prepared.fast
        if (fast is not None and (self.in_block or self.wrapped or prepared.deferred)
                and self._only_records()
                and prepared.analyzer.catalog is self.cat is self.db.catalog):
            key = fast.key(body, pos)
            if key is not None:
                if not (self.in_block or self.wrapped):  # a named one in autocommit
                    self._wrap([], True)  # PostgreSQL's implicit transaction is kept
                self._record(fast.entity, key)
                return None
        cat = self._catalog()
        pre: list[tuple[bytes, object]] = []
        st = self._prepared(prepared, pre, cat)
        for w in st.writes:
            self._touch(cat, w, bound_keys(w, body, pos, cat), pre)
        if name and (st.writes or st.kind & Kind.OPAQUE):
            self._wrap(pre, True)
        return self._send(pre)

    def may_track(self, client: ClientSession, text: bytes) -> bool:
        cat = self._catalog()
        return not cat.empty and bool(
            self.db.analyzer.analyze(text.decode("utf-8", "replace")).kind & Kind.WRITE)

    def close_now(self, client: ClientSession) -> list[bytes] | None:
        """The client's implicit transaction ends with the message just sent (its Query, or
        the Sync of its extended batch): when every key of it is known already (none comes
        back in an appended RETURNING or a pre-image), the refresh plan and COMMIT go right
        behind it, in the same round trip; the session answers ReadyForQuery after them."""
        if not self.wrapped or not self.hold or self._keys_to_come():
            return None
        cat = self._catalog()
        pre: list[tuple[bytes, object]] = []
        self._close_span(pre, cat)
        self._closing_plan(pre, cat)
        pre.append((B.query("COMMIT"), None))
        return self._send(pre)

    def _keys_to_come(self) -> bool:
        """Keys of the transaction are still on their way (pre-images, appended RETURNING)."""
        return any(isinstance(m, str) for m in self.inflight) or any(
            not s.describe and not s.abandoned for s in self.ret_live)

    def _closing_plan(self, pre: list[tuple[bytes, object]], cat: RuntimeCatalog) -> None:
        """The plan that ends the transaction the proxy took charge of, appended to ``pre``."""
        n = len(pre)
        self._plan_batch(pre, cat, self.with_new_tviews(  # type: ignore[attr-defined]
            cat, self.tracker.take()), False)
        pre[n:] = [(batch, Closing(meta)) for batch, meta in pre[n:]]
        self._end_transaction()  # type: ignore[attr-defined]
        self.wrapped = False

    def close_implicit(self, client: ClientSession) -> list[bytes] | None:
        """The client's Sync ends PostgreSQL's implicit transaction of its batch, which the
        proxy did not open a block for: the plan goes in before it, ending in the Sync that
        commits it all (no BEGIN, no COMMIT, one ReadyForQuery).  ``[]``: nothing to refresh,
        the client's Sync goes as it is.  None: keys are still to come (appended RETURNING,
        pre-images), so the transaction becomes a block first (:meth:`upgrade_at_sync`)."""
        if self._keys_to_come() or self.span is not None:  # (an audit runs in a batch too)
            return None
        pre: list[tuple[bytes, object]] = []
        self._closing_plan(pre, self._catalog())  # (which also ends ``implicit``)
        return self._send(pre) or []

    def abandon_implicit(self) -> None:
        """A statement of the batch failed before its Sync reached the proxy: the Sync rolls
        the implicit transaction back, there is nothing to refresh."""
        self.wrapped = False
        self._end_transaction()  # type: ignore[attr-defined]

    def upgrade_at_sync(self) -> tuple[bytes, int]:
        """The BEGIN that turns the batch's implicit transaction into a block, sent right
        before the client's Sync, with the number of its replies (the proxy's to swallow)."""
        self.implicit = False
        return BEGIN_IN_BATCH, BEGIN_IN_BATCH_REPLIES


# The proxy's BEGIN inside a client's batch, without a Sync, under names of its own (a
# Parse/Bind of the unnamed statement or portal would drop the client's): CloseComplete,
# ParseComplete, BindComplete, CommandComplete.
BEGIN_IN_BATCH = (B.close_statement(b"tvproxy_begin") + B.parse(b"tvproxy_begin", b"BEGIN")
                  + B.bind(b"tvproxy_begin", [], b"tvproxy_begin") + B.execute(b"tvproxy_begin"))
BEGIN_IN_BATCH_REPLIES = 4
