"""PgBouncer ``userlist.txt`` (auth_file) parsing.

Each entry is ``"username" "password"``; a doubled quote inside a quoted field stands for one
quote, anything after the password is ignored, and lines starting with ``;`` or ``#`` are comments.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["UserlistError", "load_userlist", "parse_userlist", "secret_kind"]

_MD5_SECRET = re.compile(r"md5[0-9a-f]{32}")


class UserlistError(ValueError):
    """A malformed auth_file line; the message is ``source:lineno: reason``."""


def _quoted(line: str, pos: int, what: str) -> tuple[str, int]:
    """Read a double-quoted field starting at ``line[pos]``; return (value, index after it)."""
    if pos >= len(line) or line[pos] != '"':
        raise ValueError(f"expected quoted {what}")
    out: list[str] = []
    pos += 1
    while True:
        end = line.find('"', pos)
        if end < 0:
            raise ValueError(f"unterminated quoted {what}")
        out.append(line[pos:end])
        if line.startswith('""', end):  # an escaped quote, keep going
            out.append('"')
            pos = end + 2
            continue
        return "".join(out), end + 1


def parse_userlist(text: str, source: str = "<userlist>") -> dict[str, str]:
    """Parse userlist.txt content into ``{username: password_or_secret}`` (later lines win)."""
    users: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        try:
            user, pos = _quoted(line, 0, "username")
            if not user:
                raise ValueError("empty username")
            if pos < len(line) and not line[pos].isspace():
                raise ValueError("expected whitespace after username")
            password, pos = _quoted(line, len(line) - len(line[pos:].lstrip()), "password")
            if pos < len(line) and not line[pos].isspace():
                raise ValueError("expected whitespace after password")
        except ValueError as exc:
            raise UserlistError(f"{source}:{lineno}: {exc}") from None
        users[user] = password
    return users


def load_userlist(path: str) -> dict[str, str]:
    """Read and parse an auth_file; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        return parse_userlist(f.read(), source=path)


def secret_kind(secret: str) -> Literal["plain", "md5", "scram"]:
    """Classify a stored password the way PostgreSQL does (md5 hex is lowercase only)."""
    if _MD5_SECRET.fullmatch(secret):
        return "md5"
    if secret.startswith("SCRAM-SHA-256$"):
        return "scram"
    return "plain"
