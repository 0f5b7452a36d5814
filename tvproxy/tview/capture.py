"""Which tracked rows a statement writes, read from its SQL alone (pure, no I/O).

For every INSERT/UPDATE/DELETE/MERGE on a tracked table (also inside writable CTEs) the capture
says which primary keys the statement names (literals, or bound parameters by number) or that
they cannot be known from the text (``keys is None``: the engine appends RETURNING instead), and
whether key columns (``pk_*``/``fk_*``) are assigned, so old values are needed too.  Statements
that cannot write a tracked table never reach pglast: :func:`may_write` is a first-keyword and
table-name test.  The engine reads all of this through tview/statement.py (one analysis per
text, cached per catalog and by normalised text); :func:`capture` is the same on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType

_WRITE_WORDS = re.compile(
    r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*(insert|update|delete|merge|with|copy|truncate|call|do|"
    r"execute|select)\b", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class TrackedTable:
    name: str
    entity: str
    pk: str
    key_columns: frozenset[str]  # pk_* and fk_* columns whose change moves rows between parents
    schema: str = "public"
    pk_position: int | None = None  # of the pk among the table's columns (INSERT without a list)


@dataclass(frozen=True)
class KeyRef:
    """One primary-key value named by a statement: a literal, ``$n``, or ``= ANY($n)``."""

    value: int | str | None = None
    param: int | None = None
    array: bool = False


@dataclass(frozen=True)
class WriteCapture:
    table: str
    entity: str
    op: str  # insert | update | delete | merge | copy | truncate
    keys: tuple[KeyRef, ...] | None  # None: not knowable from the text
    assigns_key_columns: bool
    has_returning: bool
    assigns_pk: bool = False  # UPDATE SET pk_... (or ON CONFLICT DO UPDATE SET pk_...)

    def with_keys(self, keys: tuple[KeyRef, ...] | None) -> WriteCapture:
        """The same write with other keys (dataclasses.replace, without its cost per call)."""
        return WriteCapture(self.table, self.entity, self.op, keys, self.assigns_key_columns,
                            self.has_returning, self.assigns_pk)


def may_write(sql: str, table_names: frozenset[str]) -> bool:
    """Cheap test: can this text write one of ``table_names``?  False means: skip it."""
    if not _WRITE_WORDS.match(sql):
        return False
    low = sql.lower()
    return any(name in low for name in table_names)


def _column_name(node: object, aliases: frozenset[str]) -> str | None:
    if not isinstance(node, ast.ColumnRef):
        return None
    fields = [f.sval for f in node.fields if isinstance(f, ast.String)]
    if len(fields) == 1 or (len(fields) == 2 and fields[0] in aliases):
        return fields[-1]
    return None


def _const(node: object) -> KeyRef | None:
    if isinstance(node, ast.ParamRef):
        return KeyRef(param=node.number)
    if isinstance(node, ast.A_Const) and not node.isnull:
        val = node.val
        if isinstance(val, ast.Integer):
            return KeyRef(value=val.ival)
        if isinstance(val, ast.String):
            return KeyRef(value=val.sval)
        if isinstance(val, ast.Float):  # big integer literals arrive as Float
            text = val.fval
            return KeyRef(value=int(text)) if text.lstrip("-").isdigit() else None
    if isinstance(node, ast.TypeCast):
        return _const(node.arg)
    return None


def _keys_from_where(where: object, pk: str, aliases: frozenset[str]) -> tuple[KeyRef, ...] | None:
    """Keys when the WHERE clause pins the pk (alone or in a top-level AND)."""
    if isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR:
        for arg in where.args:
            keys = _keys_from_where(arg, pk, aliases)
            if keys is not None:
                return keys
        return None
    if not isinstance(where, ast.A_Expr) or not where.name:
        return None
    op = where.name[-1].sval if isinstance(where.name[-1], ast.String) else None
    if op != "=":
        return None
    lcol, rcol = _column_name(where.lexpr, aliases), _column_name(where.rexpr, aliases)
    other = where.rexpr if lcol == pk else where.lexpr if rcol == pk else None
    if other is None:
        return None
    if where.kind == A_Expr_Kind.AEXPR_OP:
        ref = _const(other)
        return (ref,) if ref is not None else None
    if where.kind == A_Expr_Kind.AEXPR_IN and isinstance(other, tuple | list):
        refs = [_const(item) for item in other]
        return tuple(refs) if all(r is not None for r in refs) else None  # type: ignore[misc]
    if where.kind == A_Expr_Kind.AEXPR_OP_ANY and isinstance(other, ast.ParamRef):
        return (KeyRef(param=other.number, array=True),)
    return None


def _insert_keys(stmt: ast.InsertStmt, pk: str,
                 pk_position: int | None) -> tuple[KeyRef, ...] | None:
    select = stmt.selectStmt
    if not isinstance(select, ast.SelectStmt) or not select.valuesLists:
        return None
    if stmt.cols:
        names = [c.name for c in stmt.cols]
        if pk not in names:
            return None
        i = names.index(pk)
    elif pk_position is None:
        return None
    else:
        i = pk_position
    if any(len(row) <= i for row in select.valuesLists):
        return None
    refs = [_const(row[i]) for row in select.valuesLists]
    return tuple(refs) if all(r is not None for r in refs) else None  # type: ignore[misc]


def capture_statement(node: object, tables: Mapping[str, TrackedTable],
                      out: list[WriteCapture]) -> None:
    """Append the tracked writes of one parsed statement (``tables`` by name) to ``out``."""
    with_clause = getattr(node, "withClause", None)
    if with_clause is not None:
        for cte in with_clause.ctes:
            capture_statement(cte.ctequery, tables, out)
    rel = getattr(node, "relation", None)
    if isinstance(node, ast.CopyStmt | ast.TruncateStmt):  # opaque bulk writes: keys unknown
        rels = [rel] if isinstance(node, ast.CopyStmt) and node.is_from else (
            list(node.relations) if isinstance(node, ast.TruncateStmt) else [])
        for r in rels:
            table = tables.get(r.relname) if isinstance(r, ast.RangeVar) else None
            if table is not None and (not r.schemaname or r.schemaname == table.schema):
                op = "copy" if isinstance(node, ast.CopyStmt) else "truncate"
                out.append(WriteCapture(table.name, table.entity, op, None, True, False))
        return
    if not isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
        return
    if not isinstance(rel, ast.RangeVar):
        return
    table = tables.get(rel.relname)
    if table is None or (rel.schemaname and rel.schemaname != table.schema):
        return
    aliases = frozenset({rel.relname} | ({rel.alias.aliasname} if rel.alias else set()))
    clause = getattr(node, "returningClause", None)  # pglast >= 7 (PostgreSQL 18 grammar)
    returning = bool(clause.exprs if clause is not None else getattr(node, "returningList", None))
    if isinstance(node, ast.InsertStmt):
        conflict = node.onConflictClause
        targets = (conflict.targetList or ()) if conflict is not None else ()
        assigns = any(t.name in table.key_columns for t in targets)
        keys = _insert_keys(node, table.pk, table.pk_position)
        out.append(WriteCapture(table.name, table.entity, "insert", keys, assigns, returning,
                                any(t.name == table.pk for t in targets)))
    elif isinstance(node, ast.UpdateStmt):
        assigns = any(t.name in table.key_columns for t in node.targetList)
        keys = None if node.fromClause else _keys_from_where(node.whereClause, table.pk, aliases)
        out.append(WriteCapture(table.name, table.entity, "update", keys, assigns, returning,
                                any(t.name == table.pk for t in node.targetList)))
    elif isinstance(node, ast.DeleteStmt):
        keys = None if node.usingClause else _keys_from_where(node.whereClause, table.pk, aliases)
        out.append(WriteCapture(table.name, table.entity, "delete", keys, False, returning))
    else:
        out.append(WriteCapture(table.name, table.entity, "merge", None, True, returning))


@lru_cache(maxsize=4096)
def _capture_cached(sql: str, tables: tuple[TrackedTable, ...]) -> tuple[WriteCapture, ...]:
    by_name = {t.name: t for t in tables}
    out: list[WriteCapture] = []
    for raw in pglast.parse_sql(sql):
        capture_statement(raw.stmt, by_name, out)
    return tuple(out)


def capture(sql: str, tables: tuple[TrackedTable, ...]) -> tuple[WriteCapture, ...]:
    """Writes to tracked tables in ``sql`` (cached by text and catalog).  Raises
    ``pglast.parser.ParseError`` for text PostgreSQL will reject as well."""
    if not may_write(sql, frozenset(t.name for t in tables)):
        return ()
    return _capture_cached(sql, tables)
