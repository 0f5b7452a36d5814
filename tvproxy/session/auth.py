"""Client authentication during login: trust, plain, md5 and SCRAM-SHA-256 against auth_file."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from tvproxy.auth import (
    ScramError,
    ScramServer,
    make_scram_secret,
    md5_secret,
    md5_verify,
    parse_scram_secret,
    secret_kind,
)
from tvproxy.pool.server import ServerLoginError
from tvproxy.protocol import ProtocolError
from tvproxy.protocol import build as B
from tvproxy.protocol import decode as D

if TYPE_CHECKING:
    from tvproxy.server import ProxyServer
    from tvproxy.session.client import ClientSession


def _failed(user: str) -> ServerLoginError:
    return ServerLoginError(f'password authentication failed for user "{user}"', "28P01")


async def _password_message(client: ClientSession) -> bytes:
    mtype, body = await client.read_message()
    if mtype != 0x70:  # 'p'
        raise ProtocolError(f"expected password response, got message type {chr(mtype)!r}")
    return body


async def authenticate(client: ClientSession, proxy: ProxyServer) -> None:
    """Run the configured auth exchange; raise ServerLoginError (28P01) on failure."""
    method = proxy.cfg.auth.auth_type
    if method == "trust":
        return
    user = client.user
    secret = proxy.user_secret(user) or None  # as PostgreSQL: an empty password never matches
    if method == "md5" and secret is not None and secret_kind(secret) == "scram":
        method = "scram-sha-256"  # as PgBouncer and PostgreSQL: a SCRAM secret can't do md5
    if method == "plain" or method == "password":
        client.write(B.auth_cleartext())
        given = D.password_payload(await _password_message(client))
        if secret is None:
            raise _failed(user)
        kind = secret_kind(secret)
        if kind == "plain":
            ok = secrets.compare_digest(given, secret.encode())
        elif kind == "md5":
            ok = secrets.compare_digest(md5_secret(user, given.decode("utf-8", "replace")), secret)
        else:
            iterations, salt, _, _ = parse_scram_secret(secret)
            candidate = make_scram_secret(given.decode("utf-8", "replace"), salt, iterations)
            ok = secrets.compare_digest(candidate, secret)
        if not ok:
            raise _failed(user)
        return
    if method == "md5":
        salt = secrets.token_bytes(4)
        client.write(B.auth_md5(salt))
        response = D.password_payload(await _password_message(client))
        if secret is None or not md5_verify(user, secret, salt, response):
            raise _failed(user)
        return
    # scram-sha-256
    if secret is not None and secret_kind(secret) == "md5":
        secret = None  # an md5 secret cannot verify a SCRAM exchange
    scram = ScramServer(secret if secret is not None else secrets.token_hex(16))
    client.write(B.auth_sasl(["SCRAM-SHA-256"]))
    mech, data = D.sasl_initial(await _password_message(client))
    if mech != "SCRAM-SHA-256":
        raise ServerLoginError(f"client selected an invalid SASL authentication mechanism {mech}", "28000")
    try:
        client.write(B.auth_sasl_continue(scram.handle_client_first(data)))
        final = scram.handle_client_final(await _password_message(client))
    except ScramError as exc:
        raise _failed(user) from exc
    if secret is None:
        raise _failed(user)
    client.write(B.auth_sasl_final(final))
