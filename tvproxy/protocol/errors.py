"""Errors raised by the pure protocol layer."""

from __future__ import annotations


class ProtocolError(Exception):
    """Malformed input on the wire; the connection it came from must be closed."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
