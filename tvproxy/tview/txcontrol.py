"""Recognise transaction-control statements (pure): what the tracker must do for a statement.

The engine reads them through tview/statement.py's analysis; :func:`classify` is the same on
its own."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import pglast
from pglast import ast
from pglast.enums import TransactionStmtKind

# Statements whose first keyword is none of these cannot be transaction control.
_FIRST_WORD = re.compile(
    r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*(begin|start|commit|end|rollback|abort|savepoint|"
    r"release|prepare)\b", re.IGNORECASE | re.DOTALL)


class TxKind(Enum):
    BEGIN = "begin"
    COMMIT = "commit"
    COMMIT_AND_CHAIN = "commit_and_chain"
    ROLLBACK = "rollback"
    ROLLBACK_AND_CHAIN = "rollback_and_chain"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback_to"
    PREPARE = "prepare"
    COMMIT_PREPARED = "commit_prepared"
    ROLLBACK_PREPARED = "rollback_prepared"


@dataclass(frozen=True)
class TxCommand:
    kind: TxKind
    name: str | None = None  # savepoint name or 2PC gid


_KINDS = {
    TransactionStmtKind.TRANS_STMT_BEGIN: TxKind.BEGIN,
    TransactionStmtKind.TRANS_STMT_START: TxKind.BEGIN,
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: TxKind.SAVEPOINT,
    TransactionStmtKind.TRANS_STMT_RELEASE: TxKind.RELEASE,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: TxKind.ROLLBACK_TO,
    TransactionStmtKind.TRANS_STMT_PREPARE: TxKind.PREPARE,
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED: TxKind.COMMIT_PREPARED,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED: TxKind.ROLLBACK_PREPARED,
}


def tx_command(stmt: ast.TransactionStmt) -> TxCommand:
    """The command of one parsed transaction statement."""
    kind = TransactionStmtKind(stmt.kind)
    if kind == TransactionStmtKind.TRANS_STMT_COMMIT:
        return TxCommand(TxKind.COMMIT_AND_CHAIN if stmt.chain else TxKind.COMMIT)
    if kind == TransactionStmtKind.TRANS_STMT_ROLLBACK:
        return TxCommand(TxKind.ROLLBACK_AND_CHAIN if stmt.chain else TxKind.ROLLBACK)
    name = stmt.savepoint_name or stmt.gid
    return TxCommand(_KINDS[kind], name)


@lru_cache(maxsize=4096)
def classify(sql: str) -> tuple[TxCommand | None, ...]:
    """One entry per statement of ``sql``: its transaction command, or None for other
    statements.  A single statement whose first keyword cannot start transaction control is not
    parsed at all (``(None,)``); text that does not parse gives ``()`` (PostgreSQL rejects it).
    """
    if not _FIRST_WORD.match(sql) and ";" not in sql:
        return (None,)
    try:
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return ()
    return tuple(
        tx_command(raw.stmt) if isinstance(raw.stmt, ast.TransactionStmt) else None
        for raw in stmts
    )
