"""Statements whose keys the text does not name, rewritten to return them (pure, no I/O).

For a single INSERT/UPDATE/DELETE on a tracked table whose keys cannot be read from its text
(``UPDATE tb_post SET title = title || '!' WHERE title LIKE 'P%'``, ``INSERT ... SELECT``), the
proxy sends the statement with key columns appended to its RETURNING list and strips them from
the client's reply (protocol/strip.py).  The appended columns, always after the client's own:

- the primary key (for a DELETE: the deleted row's);
- for a table aggregated into a parent TVIEW (``fk_<parent>`` of the child): that fk, whose old
  value is what a DELETE needs (new values are also derived by the planner at refresh time);
- on PostgreSQL 18, for an UPDATE or ``ON CONFLICT DO UPDATE`` that assigns the pk or an
  aggregation fk: ``old.<column>``, the value before the statement.  Before 18 there is no way
  to return old values: an assigned pk gives no rewrite at all (the caller keeps refreshing
  every row), an assigned fk leaves that parent to a full refresh (``all_keys``).

Each appended column is cast to ``text``: whatever result format the client asked for (binary
included), the bytes of a text value are its text, so decoding needs no type knowledge.

The client's text is kept as it is: the appended columns (quoted identifiers) go after its last
token, RETURNING being the last clause of INSERT, UPDATE and DELETE.  Whether a statement is
rewritten, and what is appended, is decided from its pglast parse, once per normalised shape
(texts differing in literal values only share it).  Multi-statement texts, writable CTEs,
MERGE, RETURNING ... WITH (OLD AS ...), and tables aliased ``old``/``new`` are left alone.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from functools import lru_cache

import pglast
from pglast import ast
from pglast.enums import OnConflictAction
from pglast.parser import normalize, scan

from tvproxy.tview.analyze import quote_ident
from tvproxy.tview.capture import TrackedTable

INTEGER_TYPES = frozenset({"bigint", "integer", "smallint", "int8", "int4", "int2"})


@dataclass(frozen=True)
class KeyColumn:
    """One appended column: its values are keys of ``entity``."""

    entity: str
    column: str
    old: bool = False  # ``old.<column>`` (PostgreSQL 18)


@dataclass(frozen=True)
class ReturningRewrite:
    sql: str  # what the server runs
    table: str
    entity: str
    op: str  # insert | update | delete
    columns: tuple[KeyColumn, ...]  # appended, after the client's own
    client_columns: bool  # the client's statement has its own RETURNING
    all_keys: tuple[str, ...] = ()  # entities whose keys stay unknown (old values before 18)

    @property
    def n_extra(self) -> int:
        return len(self.columns)

    @property
    def entities(self) -> tuple[str, ...]:
        """Every entity whose keys this statement returns or leaves unknown."""
        seen = dict.fromkeys(c.entity for c in self.columns)
        seen.update(dict.fromkeys(self.all_keys))
        return tuple(seen)


def _returning(node: ast.Node) -> tuple[tuple[ast.Node, ...], object]:
    """(client's RETURNING targets, WITH options) for pglast >= 7 and older alike."""
    if "returningClause" in node:  # PostgreSQL 18 grammar
        clause = node.returningClause
        if clause is None:
            return (), None
        return tuple(clause.exprs or ()), clause.options
    return tuple(node.returningList or ()), None


def _assigned(node: ast.Node) -> tuple[str, frozenset[str]] | None:
    """(op, columns assigned by an UPDATE or an upsert's DO UPDATE), None when unsupported."""
    if isinstance(node, ast.UpdateStmt):
        return "update", frozenset(t.name for t in node.targetList or () if t.name)
    if isinstance(node, ast.DeleteStmt):
        return "delete", frozenset()
    if isinstance(node, ast.InsertStmt):
        conflict = node.onConflictClause
        if conflict is not None and conflict.action == OnConflictAction.ONCONFLICT_UPDATE:
            return "insert", frozenset(t.name for t in conflict.targetList or () if t.name)
        return "insert", frozenset()
    return None


@dataclass(frozen=True)
class _Splice:
    """The rewrite of a statement shape: the text to append after its last token."""

    suffix: str
    op: str
    columns: tuple[KeyColumn, ...]
    client_columns: bool
    all_keys: tuple[str, ...]


@lru_cache(maxsize=4096)
def _splice(text: str, table: TrackedTable, aggregations: tuple[tuple[str, str], ...],
            old_values: bool) -> _Splice | None:
    """What to append to the texts parsing as ``text`` (a statement, or its normalised shape:
    the decision depends on its structure only, never on its literal values)."""
    try:
        raws = pglast.parse_sql(text)
    except pglast.parser.ParseError:
        return None
    if len(raws) != 1:
        return None
    node = raws[0].stmt
    kind = _assigned(node)
    if kind is None:
        return None
    op, assigned = kind
    rel = node.relation
    if (not isinstance(rel, ast.RangeVar) or rel.relname != table.name
            or (rel.schemaname and rel.schemaname != table.schema)):
        return None
    if node.withClause is not None and any(
            not isinstance(cte.ctequery, ast.SelectStmt) for cte in node.withClause.ctes):
        return None  # a writable CTE: more than this statement writes
    mine, options = _returning(node)
    if options:
        return None  # RETURNING WITH (OLD AS o, ...): old/new renamed
    qualifier = rel.alias.aliasname if rel.alias is not None else rel.relname
    if qualifier in ("old", "new"):
        return None
    columns = [KeyColumn(table.entity, table.pk)]
    columns += [KeyColumn(parent, fk) for parent, fk in aggregations]
    all_keys: list[str] = []
    if table.pk in assigned:
        if not old_values:
            return None
        columns.append(KeyColumn(table.entity, table.pk, old=True))
    for parent, fk in aggregations:
        if fk in assigned:
            if old_values:
                columns.append(KeyColumn(parent, fk, old=True))
            elif parent not in all_keys:
                all_keys.append(parent)
    extra = ", ".join(
        f"CAST({'old' if c.old else quote_ident(qualifier)}.{quote_ident(c.column)} AS "
        f"pg_catalog.text)" for c in columns)
    return _Splice((", " if mine else " RETURNING ") + extra, op, tuple(columns), bool(mine),
                   tuple(all_keys))


_TRAILING = frozenset({"ASCII_59", "SQL_COMMENT", "C_COMMENT"})  # ';' and comments


def _end(sql: str) -> int | None:
    """Offset just after the statement's last token (before a closing ';' and comments)."""
    try:
        tokens = scan(sql)
    except pglast.parser.ParseError:
        return None
    for token in reversed(tokens):
        if token.name not in _TRAILING:
            return int(token.end) + 1
    return None


@lru_cache(maxsize=4096)
def rewrite_returning(sql: str, table: TrackedTable, aggregations: tuple[tuple[str, str], ...],
                      old_values: bool) -> ReturningRewrite | None:
    """The rewrite of ``sql`` (one statement writing ``table``), or None to keep the fallback.

    ``aggregations``: (parent entity, fk column of ``table``) of every TVIEW aggregating the
    table's rows; ``old_values``: the server has ``RETURNING old.*`` (PostgreSQL >= 18).

    The key columns go after the statement's last token: RETURNING is the last clause of
    INSERT, UPDATE and DELETE, so the client's text is sent as it is, its own RETURNING list
    (if any) extended.  Whether and what to append is decided once per normalised shape.
    """
    try:
        shape = normalize(sql)
    except pglast.parser.ParseError:
        return None
    plan = _splice(shape, table, aggregations, old_values)
    if plan is None and shape != sql:  # a literal where the grammar takes no parameter
        plan = _splice(sql, table, aggregations, old_values)
    if plan is None:
        return None
    end = _end(sql)
    if end is None:
        return None
    return ReturningRewrite(sql[:end] + plan.suffix + sql[end:], table.name, table.entity,
                            plan.op, plan.columns, plan.client_columns, plan.all_keys)


def key_value(raw: bytes, integer: bool) -> Hashable:
    """An appended column's value (text, whatever the result format) as a tracker key."""
    return int(raw) if integer else raw.decode()
