"""Keys touched by one client transaction, with a savepoint stack (pure, no I/O).

A key is ``(entity, pk)``.  Keys captured while a statement runs are held apart until the
statement completes: a failed statement's keys go with it.  ``SAVEPOINT`` pushes a level,
``ROLLBACK TO`` empties the levels from the named savepoint up (the savepoint stays, as in
PostgreSQL), ``RELEASE`` merges them into the level below.  Names follow PostgreSQL: the most
recent savepoint of that name is meant, and an unknown name changes nothing (PostgreSQL fails the
statement with 3B001).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

Keys = dict[str, set[Hashable]]


def _merge(into: Keys, keys: Keys) -> None:
    for entity, pks in keys.items():
        if pks:
            into.setdefault(entity, set()).update(pks)


class TransactionTracker:
    __slots__ = ("_counts", "_flushed", "_levels", "_names", "_statement", "generation",
                 "taken_touches")

    def __init__(self) -> None:
        self.generation = 0  # one more at every reset: keys that arrive late know their transaction
        self._levels: list[Keys] = [{}]
        self._names: list[str] = []  # savepoint names, one per level above the first
        self._statement: Keys = {}
        self._flushed: list[Keys] = [{}]  # keys refreshed early, by the level they ran in
        # touches (keys written, repeats included) per entity, by level: a key written again
        # is refreshed once (SHOW TVIEW STATS keys_coalesced = touches - keys)
        self._counts: list[dict[str, int]] = [{}]
        self.taken_touches: dict[str, int] = {}  # the touches of the keys last taken

    # --- statements ------------------------------------------------------------------------

    def touch(self, entity: str, pks: Iterable[Hashable]) -> None:
        """Keys written by the statement now running."""
        self._statement.setdefault(entity, set()).update(pks)

    def record(self, entity: str, pks: Iterable[Hashable]) -> None:
        """Keys written by a statement that count at once: ``touch`` then
        ``statement_succeeded`` in one step."""
        if self._statement:
            self.touch(entity, pks)
            self.statement_succeeded()
        else:
            self._count(entity, set(pks))

    def statement_succeeded(self) -> None:
        for entity, pks in self._statement.items():
            self._count(entity, pks)
        self._statement = {}

    def _count(self, entity: str, keys: set[Hashable]) -> None:
        """Keys of a statement that succeeded into the current level (``keys`` is kept)."""
        counts = self._counts[-1]
        counts[entity] = counts.get(entity, 0) + len(keys)
        if not keys:
            return
        level = self._levels[-1]
        held = level.get(entity)
        if held is None:
            level[entity] = keys
        else:
            held |= keys

    def statement_failed(self) -> None:
        self._statement = {}

    # --- savepoints ------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Number of open savepoints."""
        return len(self._names)

    def savepoint(self, name: str) -> None:
        self._names.append(name)
        self._levels.append({})
        self._flushed.append({})
        self._counts.append({})

    def _find(self, name: str) -> int | None:
        for i in range(len(self._names) - 1, -1, -1):
            if self._names[i] == name:
                return i
        return None

    def rollback_to(self, name: str) -> bool:
        i = self._find(name)
        if i is None:
            return False
        del self._names[i + 1:]
        del self._levels[i + 2:]
        self._levels[i + 1] = {}
        del self._counts[i + 2:]
        self._counts[i + 1] = {}
        for flushed in self._flushed[i + 1:]:  # those refreshes are undone: pending again
            _merge(self._levels[i], flushed)
        del self._flushed[i + 2:]
        self._flushed[i + 1] = {}
        self._statement = {}
        return True

    def release(self, name: str) -> bool:
        i = self._find(name)
        if i is None:
            return False
        below = self._levels[i]
        for level in self._levels[i + 1:]:
            _merge(below, level)
        for flushed in self._flushed[i + 1:]:
            _merge(self._flushed[i], flushed)
        for counts in self._counts[i + 1:]:
            for entity, n in counts.items():
                self._counts[i][entity] = self._counts[i].get(entity, 0) + n
        del self._counts[i + 1:]
        del self._names[i:]
        del self._levels[i + 1:]
        del self._flushed[i + 1:]
        return True

    # --- whole transaction -----------------------------------------------------------------

    def pending(self) -> Keys:
        """Every key of the transaction so far (statement in flight excluded)."""
        out: Keys = {}
        for level in self._levels:
            _merge(out, level)
        return out

    def has_pending(self, entity: str) -> bool:
        return any(level.get(entity) for level in self._levels)

    def take(self, entities: Iterable[str] | None = None) -> Keys:
        """Remove and return pending keys (of ``entities`` only, when given): a flush."""
        taken: dict[str, int] = {}
        for counts in self._counts:
            for entity in list(counts) if entities is None else set(entities) & counts.keys():
                taken[entity] = taken.get(entity, 0) + counts.pop(entity)
        self.taken_touches = taken
        if entities is None:
            out = self.pending()
            self._levels = [{} for _ in self._levels]
            return out
        wanted = set(entities)
        out: Keys = {}
        for level in self._levels:
            for entity in wanted & level.keys():
                out.setdefault(entity, set()).update(level.pop(entity))
        return out

    def flush(self) -> Keys:
        """Every pending key, refreshed now (read-your-writes): not pending any more, unless a
        ROLLBACK TO undoes the level the refresh ran in."""
        out = self.take()
        _merge(self._flushed[-1], out)
        return out

    def reset(self) -> None:
        """COMMIT, ROLLBACK or PREPARE TRANSACTION: nothing is pending any more."""
        self.generation += 1
        self._levels = [{}]
        self._names = []
        self._statement = {}
        self._flushed = [{}]
        self._counts = [{}]
        self.taken_touches = {}
