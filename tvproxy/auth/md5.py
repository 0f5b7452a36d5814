"""PostgreSQL md5 password authentication (AuthenticationMD5Password), both sides."""

from __future__ import annotations

import hashlib
import hmac

from tvproxy.auth.userlist import secret_kind

__all__ = ["md5_response", "md5_secret", "md5_verify"]


def _md5hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_secret(user: str, password: str) -> str:
    """PostgreSQL's stored md5 form: ``"md5" + md5hex(password + user)``."""
    return "md5" + _md5hex((password + user).encode())


def md5_response(user: str, secret_or_password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload (no trailing NUL) answering an MD5 challenge with ``salt``.

    An argument that already looks like an md5 secret is used as is, as PostgreSQL does.
    """
    if secret_kind(secret_or_password) == "md5":
        inner = secret_or_password[3:]
    else:
        inner = md5_secret(user, secret_or_password)[3:]
    return b"md5" + _md5hex(inner.encode() + salt).encode()


def md5_verify(user: str, stored: str, salt: bytes, response: bytes) -> bool:
    """Check a client's md5 response against a stored plain password or md5 secret.

    A SCRAM secret cannot answer an md5 challenge, so it never verifies.
    """
    if secret_kind(stored) == "scram":
        return False
    if response.endswith(b"\0"):  # tolerate the PasswordMessage terminator
        response = response[:-1]
    return hmac.compare_digest(md5_response(user, stored, salt), response)
