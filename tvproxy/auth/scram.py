"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, without channel binding.

Sans-I/O: both sides take and return the SASL payloads carried in SASLInitialResponse /
SASLResponse / AuthenticationSASLContinue / AuthenticationSASLFinal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

__all__ = [
    "MAX_ITERATIONS",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "make_scram_secret",
    "parse_scram_secret",
]

MAX_ITERATIONS = 10_000_000  # refuse upstreams that would pin a CPU for minutes
_NONCE_LEN = 18  # raw bytes, as PostgreSQL's SCRAM_RAW_NONCE_LEN
_GS2_HEADERS = {"n": "n,,", "y": "y,,"}


class ScramError(Exception):
    """SCRAM exchange failed: malformed message, unsupported feature or wrong password."""


def _saslprep(password: str) -> bytes:
    """SASLprep (RFC 4013) like PostgreSQL: on any failure fall back to the raw UTF-8 bytes."""
    raw = password.encode("utf-8", "surrogatepass")
    if password.isascii():
        return raw
    ucd = unicodedata.ucd_3_2_0
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    text = ucd.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if not text or any(check(c) for c in text for check in prohibited):
        return raw
    if any(map(stringprep.in_table_d1, text)) and (
        any(map(stringprep.in_table_d2, text))
        or not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1]))
    ):
        return raw
    return text.encode("utf-8")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ScramError(f"malformed SCRAM message: invalid base64 in {what}") from None


def _keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """Return (ClientKey, ServerKey) for a password."""
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(_NONCE_LEN))


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802 "printable": %x21-7E except ","
    return bool(nonce) and all("!" <= c <= "~" and c != "," for c in nonce)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message: not UTF-8") from None


def _attr(part: str, name: str) -> str:
    """Value of ``name=value`` or ScramError."""
    if not part.startswith(name + "="):
        raise ScramError(f"malformed SCRAM message: expected attribute {name!r}")
    return part[2:]


def make_scram_secret(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's stored form: ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``."""
    if salt is None:
        salt = secrets.token_bytes(16)
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ScramError(f"iteration count out of range: {iterations}")
    client_key, server_key = _keys(password, salt, iterations)
    stored_key = hashlib.sha256(client_key).digest()
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def parse_scram_secret(secret: str) -> tuple[int, bytes, bytes, bytes]:
    """Split a SCRAM secret into (iterations, salt, stored_key, server_key)."""
    try:
        method, params, keys = secret.split("$")
        iter_text, salt_b64 = params.split(":")
        stored_b64, server_b64 = keys.split(":")
        iterations = int(iter_text)
    except ValueError:
        raise ScramError("invalid SCRAM secret format") from None
    if method != "SCRAM-SHA-256" or iterations < 1:
        raise ScramError("invalid SCRAM secret format")
    salt = _unb64(salt_b64, "secret salt")
    stored_key = _unb64(stored_b64, "secret StoredKey")
    server_key = _unb64(server_b64, "secret ServerKey")
    if not salt or len(stored_key) != 32 or len(server_key) != 32:
        raise ScramError("invalid SCRAM secret format")
    return iterations, salt, stored_key, server_key


class ScramServer:
    """Verifies a client. Feed it the client's two messages in order.

    ``nonce`` overrides the random server nonce part (tests only).
    """

    def __init__(self, secret_or_password: str, *, nonce: str | None = None) -> None:
        secret = secret_or_password
        if not secret.startswith("SCRAM-SHA-256$"):
            secret = make_scram_secret(secret_or_password)
        self.iterations, self.salt, self.stored_key, self.server_key = parse_scram_secret(secret)
        self._server_nonce = nonce if nonce is not None else _new_nonce()
        if not _valid_nonce(self._server_nonce):
            raise ScramError("invalid server nonce")
        self._state = "first"
        self._gs2_header = ""
        self._nonce = ""
        self._auth_prefix = ""  # client-first-bare "," server-first-message
        self.username = ""  # the n= value, unused by PostgreSQL clients (they send "")
        self.client_key: bytes | None = None

    def handle_client_first(self, data: bytes) -> bytes:
        if self._state != "first":
            raise ScramError("unexpected SCRAM client-first-message")
        self._state = "failed"
        text = _decode(data)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message: bad GS2 header")
        cbind, authzid, bare = parts
        if cbind.startswith("p="):
            raise ScramError("channel binding is not supported (use SCRAM-SHA-256, not -PLUS)")
        if cbind not in _GS2_HEADERS:
            raise ScramError("malformed SCRAM message: bad channel binding flag")
        if authzid:
            raise ScramError("SCRAM authorization identity is not supported")
        fields = bare.split(",")
        if fields[0].startswith("m="):
            raise ScramError("unsupported SCRAM mandatory extension")
        if len(fields) < 2:
            raise ScramError("malformed SCRAM message: missing nonce")
        self.username = _attr(fields[0], "n").replace("=2C", ",").replace("=3D", "=")
        client_nonce = _attr(fields[1], "r")
        if not _valid_nonce(client_nonce):
            raise ScramError("malformed SCRAM message: invalid client nonce")
        self._gs2_header = _GS2_HEADERS[cbind]
        self._nonce = client_nonce + self._server_nonce
        server_first = f"r={self._nonce},s={_b64(self.salt)},i={self.iterations}"
        self._auth_prefix = f"{bare},{server_first}"
        self._state = "final"
        return server_first.encode()

    def handle_client_final(self, data: bytes) -> bytes:
        if self._state != "final":
            raise ScramError("unexpected SCRAM client-final-message")
        self._state = "failed"
        text = _decode(data)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep or "," in proof_b64:
            raise ScramError("malformed SCRAM message: missing proof")
        fields = without_proof.split(",")
        if len(fields) < 2:
            raise ScramError("malformed SCRAM message: bad client-final-message")
        if _unb64(_attr(fields[0], "c"), "channel binding") != self._gs2_header.encode():
            raise ScramError("SCRAM channel binding check failed")
        if not hmac.compare_digest(_attr(fields[1], "r").encode(), self._nonce.encode()):
            raise ScramError("SCRAM nonce mismatch")
        proof = _unb64(proof_b64, "proof")
        if len(proof) != 32:
            raise ScramError("malformed SCRAM message: bad proof length")
        auth_message = f"{self._auth_prefix},{without_proof}".encode()
        client_key = _xor(proof, _hmac(self.stored_key, auth_message))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key):
            raise ScramError("password authentication failed")
        self.client_key = client_key
        self._state = "done"
        return f"v={_b64(_hmac(self.server_key, auth_message))}".encode()


class ScramClient:
    """Logs in to an upstream PostgreSQL. ``username``/``nonce`` exist for test vectors."""

    def __init__(self, password: str, *, username: str = "", nonce: str | None = None) -> None:
        self.password = password
        self._nonce = nonce if nonce is not None else _new_nonce()
        if not _valid_nonce(self._nonce):
            raise ScramError("invalid client nonce")
        user = username.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={user},r={self._nonce}"
        self._state = "first"
        self._server_signature = b""

    def client_first(self) -> bytes:
        if self._state != "first":
            raise ScramError("SCRAM client-first-message already sent")
        self._state = "server-first"
        return f"n,,{self._first_bare}".encode()

    def handle_server_first(self, data: bytes) -> bytes:
        if self._state != "server-first":
            raise ScramError("unexpected SCRAM server-first-message")
        self._state = "failed"
        server_first = _decode(data)
        fields = server_first.split(",")
        if fields[0].startswith("m="):
            raise ScramError("unsupported SCRAM mandatory extension")
        if len(fields) < 3:
            raise ScramError("malformed SCRAM message: bad server-first-message")
        nonce = _attr(fields[0], "r")
        if not (
            len(nonce) > len(self._nonce) and nonce.startswith(self._nonce) and _valid_nonce(nonce)
        ):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        salt = _unb64(_attr(fields[1], "s"), "salt")
        try:
            iterations = int(_attr(fields[2], "i"))
        except ValueError:
            raise ScramError("malformed SCRAM message: bad iteration count") from None
        if not salt or not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError("SCRAM server sent an unacceptable salt or iteration count")
        client_key, server_key = _keys(self.password, salt, iterations)
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._first_bare},{server_first},{without_proof}".encode()
        stored_key = hashlib.sha256(client_key).digest()
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "server-final"
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify_server_final(self, data: bytes) -> None:
        if self._state != "server-final":
            raise ScramError("unexpected SCRAM server-final-message")
        self._state = "failed"
        first = _decode(data).split(",")[0]
        if first.startswith("e="):
            raise ScramError(f"SCRAM server error: {first[2:]}")
        signature = _unb64(_attr(first, "v"), "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("SCRAM server signature is invalid")
        self._state = "done"
