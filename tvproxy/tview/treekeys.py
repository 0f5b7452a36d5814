"""The key sets of self-referencing TVIEWs (pure, no I/O): :class:`SelfRule`, how a change of
one row of a tree's base table reaches other rows of its TVIEW (tview/selfref.py finds it at
CREATE), and the recursive SELECTs of those keys the planner puts in its key sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.selfterms import UNBOUNDED


@dataclass(frozen=True)
class SelfRule:
    """A TVIEW that reads other rows of its own base table (tview/selfref.py): the rows to
    refresh for keys K are K and, per term ``(down, up)``, the rows at most ``down`` levels
    below the rows at most ``up`` levels above K, parents by ``link`` in the base table's new
    state.  A row's old parent (before the transaction moved or deleted it) comes as a key of
    the pseudo-entity ``parents`` (pre-images, RETURNING): the walk of a term with ``up`` goes
    on from there one level less.  ``UNBOUNDED`` walks to the end, at most
    ``max_propagation_depth`` levels: beyond, ``guard`` (a function of the catalog schema)
    raises 54001 and the COMMIT fails.  A data cycle ends the walk where it meets keys it has
    reached already."""

    schema: str
    table: str
    pk: str
    link: str  # the fk_ column of the base table naming a row's parent
    terms: tuple[tuple[int, int], ...]
    guard: str = '"tvproxy".raise_error'
    parents: str | None = None  # pseudo-entity: old parents of the rows written

    @property
    def reads_up(self) -> int:
        """Levels of ancestors whose shared locks a written row takes: a writer of a row finds
        the rows below it (``down`` of a term) only once their writers have committed, so the
        row it would miss waits for it there; the writer's own key set holds those ancestors
        (``up`` levels above its row, then down from them, level 0 included)."""
        downs = [t[0] for t in self.terms]
        return UNBOUNDED if UNBOUNDED in downs else max(downs, default=0)

    @property
    def bounded_depth(self) -> int:
        """The most levels a bounded term propagates."""
        return max((t[0] + t[1] for t in self.terms if UNBOUNDED not in t), default=0)


class TviewSpec(Protocol):
    """What the walks need of a TVIEW (planner.TviewSpec)."""

    @property
    def table(self) -> str: ...

    @property
    def pk_type(self) -> str: ...

    @property
    def tree(self) -> SelfRule | None: ...


def walk_keys(spec: TviewSpec, inner: str, levels: int, down: bool,
              guard_depth: int | None = None) -> str:
    """SELECT of the keys of ``inner`` and of the rows of ``spec``'s base table at most
    ``levels`` below (``down``) or above them, through its self-referencing fk.

    A recursive CTE, UNION so that a key met again at the same level ends that branch (a data
    cycle goes on only until ``levels``).  ``guard_depth``: the walk is unbounded; a key first
    met beyond that depth raises 54001 (through the rule's guard function)."""
    rule = spec.tree
    assert rule is not None
    t = spec.pk_type
    tb, pk, fk = f"{q(rule.schema)}.{q(rule.table)}", q(rule.pk), q(rule.link)
    if down:
        step = f"SELECT tn.{pk}::{t}, w.n + 1 FROM w JOIN {tb} tn ON tn.{fk} = w.k"
    else:
        step = f"SELECT tn.{fk}::{t}, w.n + 1 FROM w JOIN {tb} tn ON tn.{pk} = w.k"
    limit = f"w.n < {int(levels)}" if guard_depth is None else f"w.n <= {int(guard_depth)}"
    step += f" AND {limit}" + ("" if down else f" WHERE tn.{fk} IS NOT NULL")
    walk = (f"WITH RECURSIVE w(k, n) AS (SELECT s.k::{t}, 0 FROM ({inner}) s(k)"
            f" WHERE s.k IS NOT NULL UNION {step})")
    if guard_depth is None:
        return f"SELECT d.k FROM ({walk} SELECT k FROM w) d(k)"
    message = (f"TVIEW {spec.table}: propagation through {rule.table}.{rule.link} exceeds "
               f"max_propagation_depth ({int(guard_depth)})")
    literal = "'" + message.replace("'", "''") + "'"
    return (f"SELECT d.k FROM ({walk} SELECT k, min(n) FROM w GROUP BY k) d(k, n) WHERE CASE"
            f" WHEN d.n > {int(guard_depth)} THEN {rule.guard}('54001', {literal}) ELSE true END")


def self_keys(spec: TviewSpec, inner: str, old: str | None, max_depth: int) -> str:
    """SELECT of the keys of ``inner`` and the rows of ``spec`` they reach through its own base
    table (its SelfRule's terms: up, then down); ``old``: a SELECT of the old parents of the
    rows written, one level up from them already."""
    rule = spec.tree
    assert rule is not None
    walks = [(inner, "sk", down, up) for down, up in rule.terms]
    if old is not None:
        walks += [(old, "so", down, up if up == UNBOUNDED else up - 1)
                  for down, up in rule.terms if up]
    shared = len(walks) > 1
    parts = []
    for source, name, down, up in walks:
        sql = f"SELECT k FROM {name}" if shared else source
        for levels, is_down in ((up, False), (down, True)):
            if levels == UNBOUNDED:
                sql = walk_keys(spec, sql, max_depth, is_down, max_depth)
            elif levels:
                sql = walk_keys(spec, sql, levels, is_down)
        parts.append(sql)
    if not shared:
        return parts[0]
    ctes = [f"sk(k) AS MATERIALIZED ({inner})"]
    if old is not None:
        ctes.append(f"so(k) AS MATERIALIZED ({old})")
    return f"SELECT z.k FROM (WITH {', '.join(ctes)} {' UNION '.join(parts)}) z(k)"
