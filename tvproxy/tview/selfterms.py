"""Terms of a self-referencing TVIEW (pure): from the constraints between the references to
its base table (tview/selfref.py) to how far a change of one row travels.

A constraint says every row bound to an occurrence is reached from a row bound to one of its
alternatives' occurrences by steps U (to the parent) and D (to a child).  From the root (the
row itself), every occurrence then has words of steps; a row has one parent, so D then U is no
step and a word is U^a D^b, kept as (a, b), ``UNBOUNDED`` once a count grows past the number of
occurrences (a recursion).  A row reading row x by U^a D^b is reached from x by up b, then
down a: the term (a, b) = (down, up) levels.  A term covers the smaller ones.
"""

from __future__ import annotations

UNBOUNDED = -1

# (occurrence, alternatives, mirrored): each row bound to the occurrence is reached from a row
# bound to one of the alternatives' occurrences by its steps (U: to the parent, D: to a child);
# mirrored: the same condition also constrains the other side (an inner join), the other way
Constraint = tuple[int, tuple[tuple[int, str], ...], bool]


def _up(a: int, b: int) -> list[tuple[int, int]]:
    """U appended to U^a D^b (a D then a U is no step)."""
    if b == UNBOUNDED:
        return [(a, UNBOUNDED), (UNBOUNDED if a == UNBOUNDED else a + 1, 0)]
    if b > 0:
        return [(a, b - 1)]
    return [(UNBOUNDED if a == UNBOUNDED else a + 1, 0)]


def _down(a: int, b: int) -> list[tuple[int, int]]:
    return [(a, UNBOUNDED if b == UNBOUNDED else b + 1)]


_INVERSE = {"U": "D", "D": "U"}


def _apply(w: tuple[int, int], steps: str) -> list[tuple[int, int]]:
    states = [w]
    for step in steps:
        states = [x for s in states for x in (_up(*s) if step == "U" else _down(*s))]
    return states


def terms_of(roots: set[int], constraints: list[Constraint], n: int
             ) -> tuple[set[int], tuple[tuple[int, int], ...]]:
    """Occurrences reached from the roots, and the terms (down, up) of their words.

    Every constraint bounds the rows of its occurrence, so one is enough: an occurrence takes
    the first whose alternatives are placed already (or are itself: a recursion), so words stay
    as short as the conditions allow.  A constraint on a row the roots' rows are made of (a
    root itself: a row of a recursive CTE is made from the previous one) places its
    alternatives instead, by the inverse steps (not a mirrored one: its mirror says it).  Then
    the words are computed to a fixpoint."""
    made_of = set(roots)
    backward: list[tuple[int, tuple[tuple[int, str], ...]]] = []
    chosen: dict[int, tuple[tuple[int, str], ...]] = {}
    grew = True
    while grew:
        grew = False
        for target, alts, mirrored in constraints:
            if target in made_of and not mirrored and (target, alts) not in backward:
                backward.append((target, alts))
                fresh = {s for s, _ in alts} - made_of - set(chosen)
                made_of |= fresh
                grew = grew or bool(fresh)
        placed = made_of | set(chosen)
        for target, alts, _ in constraints:
            if target not in placed and all(s in placed or s == target for s, _ in alts):
                chosen[target] = alts
                placed.add(target)
                grew = True
    for target, alts, _ in constraints:  # occurrences that only reach each other
        if target not in made_of:
            chosen.setdefault(target, alts)
    cap = max(n, 1)

    def capped(w: tuple[int, int]) -> tuple[int, int]:
        return (UNBOUNDED if w[0] > cap else w[0], UNBOUNDED if w[1] > cap else w[1])

    words: dict[int, set[tuple[int, int]]] = {r: {(0, 0)} for r in roots}

    def add(occ: int, new: set[tuple[int, int]]) -> bool:
        if new <= words.get(occ, set()):
            return False
        words.setdefault(occ, set()).update(new)
        return True

    grew = True
    while grew:
        grew = False
        for target, alts in chosen.items():
            grew = add(target, {capped(x) for source, steps in alts
                                for w in words.get(source, ()) for x in _apply(w, steps)}) or grew
        for target, alts in backward:
            for source, steps in alts:
                inverse = "".join(_INVERSE[s] for s in reversed(steps))
                grew = add(source, {capped(x) for w in words.get(target, ())
                                    for x in _apply(w, inverse)}) or grew
    terms = {w for ws in words.values() for w in ws} - {(0, 0)}
    kept = [t for t in terms if not any(o != t and _covers(o, t) for o in terms)]
    return {occ for occ, ws in words.items() if ws}, tuple(sorted(kept))


def _covers(big: tuple[int, int], small: tuple[int, int]) -> bool:
    return all(x == UNBOUNDED or (y != UNBOUNDED and y <= x)
               for x, y in zip(big, small, strict=True))
