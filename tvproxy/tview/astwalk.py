"""Walking pglast ASTs (pure): the nodes under a node, those of one expression level, its
SubLinks, the conjuncts of a condition, a node as SQL text for messages."""

from __future__ import annotations

from collections.abc import Iterator

from pglast import ast
from pglast.enums import BoolExprType
from pglast.stream import RawStream


def children(node: object) -> Iterator[ast.Node]:
    values = [getattr(node, name) for name in getattr(node, "__slots__", ())]
    while values:
        v = values.pop()
        if isinstance(v, ast.Node):
            yield v
        elif isinstance(v, (tuple, list)):
            values.extend(v)


def walk(node: ast.Node) -> Iterator[ast.Node]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(children(n))


def expr_nodes(node: ast.Node) -> Iterator[ast.Node]:
    """The nodes of an expression, not those inside its subqueries (SubLinks are yielded)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, ast.SubLink):
            if n.testexpr is not None:
                stack.append(n.testexpr)
            continue
        if isinstance(n, (ast.SelectStmt, ast.RangeSubselect)):
            continue
        stack.extend(children(n))


def sublinks(node: ast.Node | None) -> Iterator[ast.SubLink]:
    """SubLinks of an expression, not those nested inside them."""
    if node is not None:
        yield from (n for n in expr_nodes(node) if isinstance(n, ast.SubLink))


def conjuncts(node: ast.Node | None) -> list[ast.Node]:
    if node is None:
        return []
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
        return [c for a in node.args for c in conjuncts(a)]
    return [node]


def deparse(node: ast.Node) -> str:
    try:
        return str(RawStream()(node))
    except Exception:  # noqa: BLE001 - only for a message
        return type(node).__name__
