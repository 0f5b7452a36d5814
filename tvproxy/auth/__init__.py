"""Authentication: SCRAM-SHA-256 and md5 (both sides) and the PgBouncer auth_file. Pure, no I/O."""

from tvproxy.auth.md5 import md5_response, md5_secret, md5_verify
from tvproxy.auth.scram import (
    MAX_ITERATIONS,
    ScramClient,
    ScramError,
    ScramServer,
    make_scram_secret,
    parse_scram_secret,
)
from tvproxy.auth.userlist import UserlistError, load_userlist, parse_userlist, secret_kind

__all__ = [
    "MAX_ITERATIONS",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "UserlistError",
    "load_userlist",
    "make_scram_secret",
    "md5_response",
    "md5_secret",
    "md5_verify",
    "parse_scram_secret",
    "parse_userlist",
    "secret_kind",
]
