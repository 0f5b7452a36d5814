"""Unit tests for tvproxy.auth: userlist parsing, md5 and SCRAM-SHA-256 (no server)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tvproxy.auth import (
    ScramClient,
    ScramError,
    ScramServer,
    UserlistError,
    load_userlist,
    make_scram_secret,
    md5_response,
    md5_secret,
    md5_verify,
    parse_scram_secret,
    parse_userlist,
    secret_kind,
)

# --- userlist -----------------------------------------------------------------------------------


def test_userlist_parses_entries_comments_and_escapes() -> None:
    text = (
        "; comment\n"
        "# another comment\n"
        "\n"
        '"alice" "s3cret"\n'
        '  "bob"   "pa""ss" "extra field" ignored\n'
        '"we""ird" ""\n'
        '"md5user" "md53175bce1d3201d16594cebf9d7eb3f9d"\n'
    )
    assert parse_userlist(text) == {
        "alice": "s3cret",
        "bob": 'pa"ss',
        'we"ird': "",
        "md5user": "md53175bce1d3201d16594cebf9d7eb3f9d",
    }


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("alice secret", "expected quoted username"),
        ('"alice"', "expected quoted password"),
        ('"alice" secret', "expected quoted password"),
        ('"alice" "secret', "unterminated quoted password"),
        ('"alice', "unterminated quoted username"),
        ('"" "x"', "empty username"),
        ('"alice""x" "y"x', "expected whitespace after password"),
    ],
)
def test_userlist_malformed_line_names_source_and_line(line: str, reason: str) -> None:
    with pytest.raises(UserlistError, match=rf"^users\.txt:2: {reason}"):
        parse_userlist(f'"ok" "ok"\n{line}\n', source="users.txt")


def test_load_userlist(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text('"u" "p"\n"broken\n', encoding="utf-8")
    with pytest.raises(UserlistError, match=rf"^{re.escape(str(path))}:2: "):
        load_userlist(str(path))
    path.write_text('"u" "p"\n', encoding="utf-8")
    assert load_userlist(str(path)) == {"u": "p"}


def test_secret_kind() -> None:
    assert secret_kind("md53175bce1d3201d16594cebf9d7eb3f9d") == "md5"
    assert secret_kind("md53175BCE1d3201d16594cebf9d7eb3f9d") == "plain"
    assert secret_kind("md5abc") == "plain"
    assert secret_kind(make_scram_secret("x")) == "scram"
    assert secret_kind("hunter2") == "plain"


# --- md5 ----------------------------------------------------------------------------------------


def test_md5_known_vector() -> None:
    assert md5_secret("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"


def test_md5_response_matches_definition() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"pwalice").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert md5_response("alice", "pw", salt) == expected
    assert md5_response("alice", md5_secret("alice", "pw"), salt) == expected


def test_md5_verify() -> None:
    salt = b"abcd"
    response = md5_response("alice", "pw", salt)
    assert md5_verify("alice", "pw", salt, response)
    assert md5_verify("alice", md5_secret("alice", "pw"), salt, response)
    assert md5_verify("alice", "pw", salt, response + b"\0")
    assert not md5_verify("alice", "wrong", salt, response)
    assert not md5_verify("bob", "pw", salt, response)
    assert not md5_verify("alice", "pw", b"dcba", response)
    assert not md5_verify("alice", make_scram_secret("pw"), salt, response)


# --- SCRAM --------------------------------------------------------------------------------------

RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_NONCE = RFC_CLIENT_NONCE + RFC_SERVER_NONCE


def _exchange(server: ScramServer, client: ScramClient) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


def test_rfc7677_vector_client_side() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == f"n,,n=user,r={RFC_CLIENT_NONCE}".encode()
    final = client.handle_server_first(f"r={RFC_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode())
    assert (
        final == (f"c=biws,r={RFC_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=").encode()
    )
    client.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_rfc7677_vector_server_side() -> None:
    server = ScramServer(make_scram_secret("pencil", RFC_SALT, 4096), nonce=RFC_SERVER_NONCE)
    first = server.handle_client_first(f"n,,n=user,r={RFC_CLIENT_NONCE}".encode())
    assert first == f"r={RFC_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()
    final = server.handle_client_final(
        f"c=biws,r={RFC_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".encode()
    )
    assert final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert server.username == "user"
    assert server.client_key is not None
    assert hashlib.sha256(server.client_key).digest() == server.stored_key


def test_round_trip_plain_password_and_secret() -> None:
    _exchange(ScramServer("hunter2"), ScramClient("hunter2"))
    server = ScramServer(make_scram_secret("hunter2"))
    _exchange(server, ScramClient("hunter2"))
    assert server.client_key is not None


def test_secret_parse_round_trip_and_login() -> None:
    secret = make_scram_secret("secret", salt=b"0123456789abcdef", iterations=4096)
    assert secret.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    iterations, salt, stored_key, server_key = parse_scram_secret(secret)
    assert (iterations, salt) == (4096, b"0123456789abcdef")
    assert len(stored_key) == len(server_key) == 32
    _exchange(ScramServer(secret), ScramClient("secret"))


@pytest.mark.parametrize(
    "bad",
    ["", "SCRAM-SHA-256$x:abc$a:b", "SCRAM-SHA-1$4096:MDEy$AAAA:AAAA", "SCRAM-SHA-256$4096:!!$a:b"],
)
def test_parse_scram_secret_rejects_garbage(bad: str) -> None:
    with pytest.raises(ScramError):
        parse_scram_secret(bad)


def test_wrong_password_fails() -> None:
    server, client = ScramServer(make_scram_secret("right")), ScramClient("wrong")
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(ScramError, match="password authentication failed"):
        server.handle_client_final(final)
    assert server.client_key is None


def test_tampered_nonce_fails() -> None:
    server, client = ScramServer("pw"), ScramClient("pw")
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    tampered = final.replace(b",r=", b",r=X", 1)
    with pytest.raises(ScramError, match="nonce mismatch"):
        server.handle_client_final(tampered)


def test_client_rejects_foreign_server_nonce_and_bad_iterations() -> None:
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    with pytest.raises(ScramError, match="nonce"):
        client.handle_server_first(b"r=xyzdef,s=AAAA,i=4096")
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    with pytest.raises(ScramError, match="iteration"):
        client.handle_server_first(b"r=abcdef,s=AAAA,i=0")


def test_client_rejects_bad_server_signature_and_error() -> None:
    server, client = ScramServer("pw"), ScramClient("pw")
    server.handle_client_final(
        client.handle_server_first(server.handle_client_first(client.client_first()))
    )
    with pytest.raises(ScramError, match="signature"):
        client.verify_server_final(b"v=" + base64.b64encode(b"\0" * 32))
    client = ScramClient("pw")
    client.handle_server_first(ScramServer("pw").handle_client_first(client.client_first()))
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_server_accepts_y_flag_and_rejects_channel_binding() -> None:
    server = ScramServer("pw")
    server.handle_client_first(b"y,,n=,r=abc")
    with pytest.raises(ScramError, match="channel binding is not supported"):
        ScramServer("pw").handle_client_first(b"p=tls-server-end-point,,n=,r=abc")


@pytest.mark.parametrize(
    "first",
    [b"", b"n,,", b"n,,n=", b"x,,n=,r=abc", b"n,a=admin,n=,r=abc", b"n,,m=ext,n=,r=a", b"\xff"],
)
def test_server_rejects_malformed_client_first(first: bytes) -> None:
    with pytest.raises(ScramError):
        ScramServer("pw").handle_client_first(first)


def test_server_rejects_out_of_order_and_malformed_final() -> None:
    server = ScramServer("pw")
    with pytest.raises(ScramError):
        server.handle_client_final(b"c=biws,r=abc,p=AAAA")
    server = ScramServer("pw")
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        server.handle_client_final(b"c=biws,r=abc")


@settings(max_examples=25, deadline=None)
@given(password=st.text(max_size=40), salt=st.binary(min_size=1, max_size=32))
def test_property_round_trip(password: str, salt: bytes) -> None:
    secret = make_scram_secret(password, salt=salt, iterations=64)
    iterations, parsed_salt, _, _ = parse_scram_secret(secret)
    assert (iterations, parsed_salt) == (64, salt)
    _exchange(ScramServer(secret), ScramClient(password))
    server, client = ScramServer(secret), ScramClient(password + "x")
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(ScramError):
        server.handle_client_final(final)


@settings(max_examples=50, deadline=None)
@given(user=st.text(max_size=20), password=st.text(max_size=20), salt=st.binary(max_size=8))
def test_property_md5(user: str, password: str, salt: bytes) -> None:
    assume(secret_kind(password) == "plain")  # text shaped like a stored secret is one
    response = md5_response(user, password, salt)
    assert md5_verify(user, password, salt, response)
    assert md5_verify(user, md5_secret(user, password), salt, response)


@pytest.mark.parametrize("variant", ["I\u00adX", "\u2168", "\uff29\uff38"])
def test_saslprep_equivalent_passwords(variant: str) -> None:
    # RFC 4013 examples: soft hyphen maps to nothing, NFKC folds the Roman numeral / full width
    _exchange(ScramServer(make_scram_secret("IX")), ScramClient(variant))
