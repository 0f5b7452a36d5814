"""Protocol-level named prepared statements shared across servers in transaction mode.

A client's statement name maps to a proxy-global statement keyed by its exact Parse body
(query text and parameter types); the server-side name is ``tvp_<n>``.  Identical statements of
different clients share one server-side statement.  Entries are reference counted by clients.
"""

from __future__ import annotations

from tvproxy.protocol import build as B


class PreparedStatement:
    __slots__ = ("server_name", "parse_msg", "refs", "key", "validated")

    def __init__(self, key: bytes, server_name: bytes) -> None:
        self.key = key
        self.server_name = server_name
        self.parse_msg = B.parse_raw(server_name, key)
        self.refs = 0
        self.validated = False  # a server accepted it once: safe to acknowledge without one


class PreparedRegistry:
    def __init__(self) -> None:
        self._by_key: dict[bytes, PreparedStatement] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def acquire(self, key: bytes) -> PreparedStatement:
        """The shared statement for a Parse body after its name (query, types)."""
        stmt = self._by_key.get(key)
        if stmt is None:
            self._next += 1
            stmt = PreparedStatement(key, b"tvp_%d" % self._next)
            self._by_key[key] = stmt
        stmt.refs += 1
        return stmt

    def lookup(self, key: bytes) -> PreparedStatement | None:
        return self._by_key.get(key)

    def release(self, stmt: PreparedStatement) -> None:
        stmt.refs -= 1
        if stmt.refs <= 0 and self._by_key.get(stmt.key) is stmt:
            del self._by_key[stmt.key]
