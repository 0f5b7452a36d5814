"""Configuration: TOML (or an imported pgbouncer.ini) into dataclasses.

Every problem is reported as one line, ``<file>: <key>: <reason>``, so an operator can fix a
config from the first error alone.  Unknown keys are errors, except PgBouncer's own setting names:
those are accepted with a warning, so an existing PgBouncer config migrates key by key.

Precedence, lowest first: dataclass defaults, the file, ``TVPROXY_<SECTION>_<KEY>`` environment
variables (the CLI's ``--set`` writes those too, so a SIGHUP reload keeps them).
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "ProxyConfig",
    "TviewConfig",
    "config_rows",
    "load_config",
    "parse_config",
    "parse_dsn",
    "set_runtime_value",
    "validate_for_serve",
]

POOL_MODES = ("transaction", "session")
AUTH_TYPES = ("trust", "md5", "scram-sha-256", "plain")
OPAQUE_WRITES = ("refresh", "reject")
RESERVED_DATABASES = ("tvproxy", "pgbouncer")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line: ``<source>: <key>: <reason>``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = " ".join(str(reason).split())  # never more than one line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key:
            return f"{self.source}: {self.key}: {self.reason}"
        return f"{self.source}: {self.reason}"


# --------------------------------------------------------------------------------------------
# The dataclasses.  Field names are PgBouncer's where PgBouncer has the setting.


@dataclass
class ProxyConfig:
    listen_addr: str = "127.0.0.1"
    listen_port: int = 6432
    pool_mode: str = "transaction"
    workers: int = 1
    max_client_conn: int = 100
    default_pool_size: int = 20
    min_pool_size: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    max_db_connections: int = 0
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 15.0
    server_check_delay: float = 30.0
    server_check_query: str = "select 1"
    server_reset_query: str = "DISCARD ALL"
    query_timeout: float = 0.0
    query_wait_timeout: float = 120.0
    idle_transaction_timeout: float = 0.0
    client_idle_timeout: float = 0.0
    client_login_timeout: float = 60.0
    max_prepared_statements: int = 200
    max_packet_size: int = 1 << 30  # 1 GiB: PostgreSQL's own limit for one message
    ignore_startup_parameters: list[str] = field(default_factory=list)
    stats_period: float = 60.0
    tcp_keepalive: bool = True
    listen_backlog: int = 128
    unix_socket_dir: str = ""


@dataclass
class AuthConfig:
    auth_type: str = "scram-sha-256"
    auth_file: str = ""  # absolute once loaded (relative paths resolve against the config's dir)


@dataclass
class AdminConfig:
    admin_users: list[str] = field(default_factory=list)
    stats_users: list[str] = field(default_factory=list)
    metrics_port: int = 0  # 0 = no Prometheus endpoint


@dataclass
class DatabaseConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = ""  # defaults to name
    user: str = ""  # empty = log in upstream as the client's user
    password: str = ""
    pool_size: int | None = None
    min_pool_size: int | None = None
    reserve_pool_size: int | None = None
    pool_mode: str | None = None
    max_db_connections: int = 0
    dsn: str = ""  # libpq URI or key=value string; fills host/port/dbname/user/password


@dataclass
class TviewConfig:
    enabled: bool = True
    schema: str = "tvproxy"
    max_propagation_depth: int = 100
    read_your_writes: bool = True
    opaque_writes: str = "refresh"
    recovery_interval: float = 30.0
    # First int4 key of the two-key advisory lock form pg_advisory_xact_lock(int4, int4) used by
    # TVIEW refreshes: 0x7476 is ASCII "tv".  Applications using the one-bigint form or another
    # namespace never collide; change it if an application already uses this namespace.
    lock_namespace: int = 0x7476


@dataclass
class Config:
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    databases: dict[str, DatabaseConfig] = field(default_factory=dict)
    tview: TviewConfig = field(default_factory=TviewConfig)
    path: str | None = None
    warnings: list[str] = field(default_factory=list)


SECTIONS: dict[str, type] = {
    "proxy": ProxyConfig,
    "auth": AuthConfig,
    "admin": AdminConfig,
    "tview": TviewConfig,
}


# --------------------------------------------------------------------------------------------
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# PgBouncer's setting names (doc/config.md, 1.18 .. 1.25).  Accepted with a warning when
# tvproxy does not implement them, so a PgBouncer configuration migrates.

PGBOUNCER_GLOBAL_SETTINGS = _words(
    """
    logfile pidfile listen_addr listen_port unix_socket_dir unix_socket_mode unix_socket_group
    user pool_mode max_client_conn default_pool_size min_pool_size reserve_pool_size
    reserve_pool_timeout max_db_connections max_db_client_connections max_user_connections
    max_user_client_connections server_round_robin track_extra_parameters
    ignore_startup_parameters peer_id disable_pqexec application_name_add_host conffile
    service_name job_name stats_period max_prepared_statements scram_iterations
    auth_type auth_hba_file auth_ident_file auth_file auth_user auth_query auth_dbname
    auth_ldap_options
    syslog syslog_ident syslog_facility log_connections log_disconnections log_pooler_errors
    log_stats verbose
    admin_users stats_users
    server_reset_query server_reset_query_always server_check_delay server_check_query
    server_fast_close server_lifetime server_idle_timeout server_connect_timeout
    server_login_retry client_login_timeout autodb_idle_timeout pool_idle_timeout dns_max_ttl
    dns_nxdomain_ttl dns_zone_check_period resolv_conf query_wait_notify login_notify_message
    client_tls_sslmode client_tls_key_file client_tls_cert_file client_tls_ca_file
    client_tls_protocols client_tls_ciphers client_tls13_ciphers client_tls_ecdhcurve
    client_tls_dheparams server_tls_sslmode server_tls_ca_file server_tls_key_file
    server_tls_cert_file server_tls_protocols server_tls_ciphers server_tls13_ciphers
    query_timeout query_wait_timeout cancel_wait_timeout client_idle_timeout
    idle_transaction_timeout transaction_timeout suspend_timeout
    pkt_buf max_packet_size listen_backlog sbuf_loopcnt so_reuseport tcp_defer_accept
    tcp_socket_buffer tcp_keepalive tcp_keepcnt tcp_keepidle tcp_keepintvl tcp_user_timeout
    """
)

PGBOUNCER_DATABASE_SETTINGS = _words(
    """
    dbname host port user password auth_user auth_query auth_dbname pool_size min_pool_size
    reserve_pool_size reserve_pool connect_query pool_mode query_wait_timeout load_balance_hosts
    target_session_attrs max_db_connections max_db_client_connections server_lifetime
    client_encoding datestyle timezone
    """
)

# libpq connection parameters that may appear in a dsn but do not configure the pool.
LIBPQ_PARAMETERS = _words(
    """
    host hostaddr port dbname user password passfile channel_binding connect_timeout
    client_encoding options application_name fallback_application_name keepalives
    keepalives_idle keepalives_interval keepalives_count tcp_user_timeout replication gssencmode
    sslmode requiressl sslcompression sslcert sslkey sslpassword sslcertmode sslrootcert sslcrl
    sslcrldir sslsni requirepeer ssl_min_protocol_version ssl_max_protocol_version krbsrvname
    gsslib gssdelegation service target_session_attrs load_balance_hosts require_auth
    sslnegotiation max_protocol_version min_protocol_version
    """
)

PGBOUNCER_SECTIONS_IGNORED = ("users", "peers")

# Keys that cannot change in a running process (SHOW CONFIG 'changeable' = no).
NOT_CHANGEABLE = frozenset(
    {"listen_addr", "listen_port", "unix_socket_dir", "listen_backlog", "workers", "metrics_port"}
)

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


# --------------------------------------------------------------------------------------------
# Value checking


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


_TRUE = {"1", "true", "on", "yes", "y", "t"}
_FALSE = {"0", "false", "off", "no", "n", "f"}


def _coerce(tp: Any, value: Any, from_text: bool) -> Any:
    """Return ``value`` converted to ``tp`` or raise ValueError(reason).

    ``from_text`` is set for values that arrive as strings by nature (environment, SET,
    pgbouncer.ini, dsn): those are parsed; TOML values must already have the right type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if value is None or (from_text and isinstance(value, str) and value.strip() == ""):
            return None
        return _coerce(inner, value, from_text)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and from_text:
            v = value.strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
        raise ValueError(f"expected a boolean (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and from_text:
            try:
                return (
                    int(value.strip(), 0)
                    if value.strip().lower().startswith("0x")
                    else int(value.strip())
                )
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            f = float(value)
        elif isinstance(value, str) and from_text:
            try:
                f = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number of seconds, got {_describe(value)}") from None
        else:
            raise ValueError(f"expected a number of seconds, got {_describe(value)}")
        if math.isnan(f) or math.isinf(f):
            raise ValueError(f"expected a finite number, got {_describe(value)}")
        return f
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {_describe(value)}")
    if origin is list:
        if isinstance(value, str):  # PgBouncer style: "a, b, c"
            return [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, list):
            out = []
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"expected a list of strings, got item {_describe(item)}")
                out.append(item)
            return out
        raise ValueError(f"expected a list of strings, got {_describe(value)}")
    raise ValueError(f"unsupported type {tp!r}")  # pragma: no cover - programming error


def _check_range(key: str, value: Any) -> None:
    """Per-key constraints beyond the type; raise ValueError(reason)."""
    if value is None:
        return
    if key in ("listen_port", "port"):
        if not 1 <= value <= 65535:
            raise ValueError(f"expected a port number 1..65535, got {value}")
    elif key == "metrics_port":
        if not 0 <= value <= 65535:
            raise ValueError(f"expected a port number 1..65535 (0 = off), got {value}")
    elif key == "pool_mode":
        if value == "statement":
            raise ValueError("statement pooling is not supported; use transaction or session")
        if value not in POOL_MODES:
            raise ValueError(f"expected one of {', '.join(POOL_MODES)}, got {value!r}")
    elif key == "auth_type":
        if value not in AUTH_TYPES:
            raise ValueError(f"expected one of {', '.join(AUTH_TYPES)}, got {value!r}")
    elif key == "opaque_writes":
        if value not in OPAQUE_WRITES:
            raise ValueError(f"expected one of {', '.join(OPAQUE_WRITES)}, got {value!r}")
    elif key in ("workers", "max_client_conn", "listen_backlog", "max_propagation_depth"):
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
    elif key == "max_packet_size":
        if not 1024 <= value <= 2147483647:
            raise ValueError(f"expected 1024..2147483647 bytes, got {value}")
    elif key == "lock_namespace":
        if not -(2**31) <= value < 2**31:
            raise ValueError(f"expected a 32-bit signed integer, got {value}")
    elif key == "schema":
        if not _IDENT_RE.match(value):
            raise ValueError(f"expected a plain SQL identifier, got {value!r}")
    elif key in ("host", "listen_addr"):
        if key == "host" and not value.strip():
            raise ValueError("must not be empty")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"must not be negative, got {value}")


def _convert(source: str, dotted: str, key: str, tp: Any, value: Any, from_text: bool) -> Any:
    try:
        out = _coerce(tp, value, from_text)
        _check_range(key, out)
    except ValueError as e:
        raise ConfigError(source, dotted, str(e)) from None
    return out


# --------------------------------------------------------------------------------------------
# DSN parsing


def parse_dsn(dsn: str) -> dict[str, str]:
    """Parse a libpq connection string (URI or key=value) into a dict of strings.

    Raises ValueError with a one-line reason.
    """
    dsn = dsn.strip()
    if dsn.startswith(("postgresql://", "postgres://")):
        return _parse_uri(dsn)
    return _parse_kv(dsn)


def _parse_uri(dsn: str) -> dict[str, str]:
    parts = urllib.parse.urlsplit(dsn)
    out: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, password = userinfo.partition(":")
        if user:
            out["user"] = urllib.parse.unquote(user)
        if sep:
            out["password"] = urllib.parse.unquote(password)
    else:
        hostport = netloc
    if hostport:
        if hostport.startswith("["):  # [ipv6]:port
            end = hostport.find("]")
            if end < 0:
                raise ValueError(f"bad host in URI: {hostport!r}")
            host, rest = hostport[1:end], hostport[end + 1 :]
            if rest.startswith(":") and rest[1:]:
                out["port"] = rest[1:]
        elif "," in hostport:
            out["host"] = ",".join(h.rsplit(":", 1)[0] for h in hostport.split(","))
            ports = [h.rsplit(":", 1)[1] for h in hostport.split(",") if ":" in h]
            if ports:
                out["port"] = ports[0]
            host = ""
        else:
            host, sep, port = hostport.partition(":")
            if sep and port:
                out["port"] = port
        if host:
            out["host"] = urllib.parse.unquote(host)
    path = parts.path.lstrip("/")
    if path:
        out["dbname"] = urllib.parse.unquote(path)
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        out[k] = v
    return out


def _parse_kv(dsn: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return out
        start = i
        while i < n and not dsn[i].isspace() and dsn[i] != "=":
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n or dsn[i] != "=" or not key:
            raise ValueError(
                f"expected key=value in connection string near {dsn[start : start + 20]!r}"
            )
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        buf = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quoted value for {key!r} in connection string")
                c = dsn[i]
                if c == "\\" and i + 1 < n:
                    buf.append(dsn[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    buf.append(dsn[i + 1])
                    i += 2
                else:
                    buf.append(dsn[i])
                    i += 1
        out[key] = "".join(buf)


# --------------------------------------------------------------------------------------------
# Building a Config from a nested dict (TOML, ini import) plus environment overrides


class _Builder:
    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.base_dir = base_dir
        self.warnings: list[str] = []

    def warn(self, source: str, key: str, reason: str) -> None:
        self.warnings.append(f"{source}: {key}: {reason}")

    def section(
        self,
        name: str,
        cls: type,
        data: Any,
        obj: Any,
        from_text: bool = False,
        source: str | None = None,
    ) -> None:
        src = source or self.source
        if not isinstance(data, dict):
            raise ConfigError(src, name, f"expected a table [{name}], got {_describe(data)}")
        hints = _hints(cls)
        for key, value in data.items():
            dotted = f"{name}.{key}"
            if key in hints:
                setattr(obj, key, _convert(src, dotted, key, hints[key], value, from_text))
                continue
            self.unknown(src, name, key)

    def unknown(self, src: str, section: str, key: str) -> None:
        dotted = f"{section}.{key}"
        for other, cls in SECTIONS.items():
            if other != section and key in _hints(cls):
                raise ConfigError(src, dotted, f"unknown key; {key} belongs in [{other}]")
        if section in ("proxy", "auth", "admin") and key in PGBOUNCER_GLOBAL_SETTINGS:
            self.warn(src, dotted, "PgBouncer setting not implemented by tvproxy; ignored")
            return
        raise ConfigError(src, dotted, "unknown key")

    def database(
        self,
        name: str,
        data: Any,
        from_text: bool = False,
        source: str | None = None,
        existing: DatabaseConfig | None = None,
    ) -> DatabaseConfig:
        src = source or self.source
        prefix = f"databases.{name}"
        if isinstance(data, str):  # PgBouncer style: app = "host=... dbname=..."
            data = {"dsn": data}
        if not isinstance(data, dict):
            raise ConfigError(
                src, prefix, f"expected a table or a connection string, got {_describe(data)}"
            )
        if not name or name in RESERVED_DATABASES:
            raise ConfigError(
                src, prefix, f"database name {name!r} is reserved for the admin console"
            )
        db = existing or DatabaseConfig(name=name)
        hints = _hints(DatabaseConfig)
        explicit = {}
        for key, value in data.items():
            if key == "name":
                raise ConfigError(
                    src, f"{prefix}.name", "unknown key; the name is the table's name"
                )
            if key in hints:
                explicit[key] = _convert(src, f"{prefix}.{key}", key, hints[key], value, from_text)
            elif key in PGBOUNCER_DATABASE_SETTINGS:
                self.warn(
                    src, f"{prefix}.{key}", "PgBouncer setting not implemented by tvproxy; ignored"
                )
            else:
                raise ConfigError(src, f"{prefix}.{key}", "unknown key")
        dsn = explicit.get("dsn")
        if dsn:
            self.apply_dsn(src, prefix, db, dsn)
        for key, value in explicit.items():
            setattr(db, key, value)
        return db

    def apply_dsn(self, src: str, prefix: str, db: DatabaseConfig, dsn: str) -> None:
        key = f"{prefix}.dsn"
        try:
            params = parse_dsn(dsn)
        except ValueError as e:
            raise ConfigError(src, key, str(e)) from None
        hints = _hints(DatabaseConfig)
        for k, v in params.items():
            if k in hints and k not in ("name", "dsn"):
                setattr(db, k, _convert(src, f"{key}.{k}", k, hints[k], v, True))
            elif k == "reserve_pool":  # PgBouncer's old alias
                db.reserve_pool_size = _convert(src, f"{key}.{k}", k, int, v, True)
            elif k in PGBOUNCER_DATABASE_SETTINGS or k in LIBPQ_PARAMETERS:
                self.warn(src, f"{key}.{k}", "connection parameter not used by tvproxy; ignored")
            else:
                raise ConfigError(src, f"{key}.{k}", "unknown connection parameter")

    def build(self, data: dict[str, Any]) -> Config:
        cfg = Config()
        for name, value in data.items():
            if name in SECTIONS:
                self.section(name, SECTIONS[name], value, getattr(cfg, name))
            elif name == "databases":
                if not isinstance(value, dict):
                    raise ConfigError(
                        self.source, "databases", f"expected a table, got {_describe(value)}"
                    )
                for dbname, dbdata in value.items():
                    cfg.databases[dbname] = self.database(dbname, dbdata)
            elif name in PGBOUNCER_SECTIONS_IGNORED:
                self.warn(
                    self.source,
                    name,
                    f"PgBouncer [{name}] section not implemented by tvproxy; ignored",
                )
            elif name == "pgbouncer":
                raise ConfigError(
                    self.source,
                    name,
                    "unknown section; PgBouncer's [pgbouncer] settings go in [proxy], [auth] and [admin]",
                )
            elif isinstance(value, dict):
                raise ConfigError(self.source, name, "unknown section")
            else:
                raise ConfigError(
                    self.source, name, "unknown key (settings go in a section such as [proxy])"
                )
        return cfg

    def env(self, cfg: Config, env: Mapping[str, str]) -> None:
        for var in sorted(env):
            if not var.startswith("TVPROXY_"):
                continue
            rest = var[len("TVPROXY_") :]
            section, _, key = rest.partition("_")
            section = section.lower()
            key = key.lower()
            src = f"${var}"
            if section in SECTIONS:
                if not key:
                    raise ConfigError(src, section, "missing key name")
                self.section(
                    section,
                    SECTIONS[section],
                    {key: env[var]},
                    getattr(cfg, section),
                    from_text=True,
                    source=src,
                )
            elif section == "databases":
                self.env_database(cfg, src, key, env[var])
            # other TVPROXY_* variables (TVPROXY_TEST_DSN, ...) are not configuration

    def env_database(self, cfg: Config, src: str, rest: str, value: str) -> None:
        keys = sorted((k for k in _hints(DatabaseConfig) if k != "name"), key=len, reverse=True)
        for k in keys:
            if rest.endswith("_" + k) and len(rest) > len(k) + 1:
                name = rest[: -len(k) - 1]
                break
        else:
            raise ConfigError(
                src, f"databases.{rest}", "expected TVPROXY_DATABASES_<NAME>_<KEY> with a known key"
            )
        existing = next((n for n in cfg.databases if n.lower() == name), None)
        if existing is None:
            existing = name
            cfg.databases[name] = DatabaseConfig(name=name)
        self.database(
            existing, {k: value}, from_text=True, source=src, existing=cfg.databases[existing]
        )

    def finish(self, cfg: Config) -> Config:
        for name, db in cfg.databases.items():
            if not db.dbname:
                db.dbname = name
        if cfg.auth.auth_file and not os.path.isabs(cfg.auth.auth_file):
            cfg.auth.auth_file = os.path.normpath(os.path.join(self.base_dir, cfg.auth.auth_file))
        cfg.warnings = self.warnings
        return cfg


def parse_config(text: str, path: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Parse TOML ``text``; ``path`` names it in errors and anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        where = f"line {m.group(1)}" if m else ""
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(path, where, f"invalid TOML: {reason}") from None
    return _from_dict(data, path, env)


def _from_dict(
    data: dict[str, Any], path: str, env: Mapping[str, str] | None, from_text: bool = False
) -> Config:
    base_dir = os.path.dirname(os.path.abspath(path)) if not path.startswith("<") else os.getcwd()
    b = _Builder(path, base_dir)
    cfg = _build_from_text(b, data) if from_text else b.build(data)
    b.env(cfg, os.environ if env is None else env)
    cfg.path = os.path.abspath(path) if not path.startswith("<") else None
    return b.finish(cfg)


_PGBOUNCER_SECTION_RE = re.compile(r"(?m)^\s*\[pgbouncer\]\s*$")


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Load a TOML file (or a PgBouncer ini file: ``*.ini`` or one with a ``[pgbouncer]``
    section) and apply environment overrides.

    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read config file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "config file is not valid UTF-8") from None
    if path.endswith(".ini") or _PGBOUNCER_SECTION_RE.search(text):
        return parse_pgbouncer_ini(text, path, env)
    return parse_config(text, path, env)


# --------------------------------------------------------------------------------------------
# pgbouncer.ini import


def parse_pgbouncer_ini(
    text: str, path: str = "<string>", env: Mapping[str, str] | None = None
) -> Config:
    """Read a PgBouncer ini file: [pgbouncer] maps onto [proxy]/[auth]/[admin]."""
    parser = configparser.ConfigParser(
        interpolation=None,
        comment_prefixes=(";", "#"),
        inline_comment_prefixes=None,
        strict=False,
        delimiters=("=",),
    )
    parser.optionxform = str  # keep case of database names
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("%include")]
    if len(lines) != len(text.splitlines()):
        raise ConfigError(path, "%include", "include directives are not supported; inline the file")
    try:
        parser.read_string("\n".join(lines), source=path)
    except configparser.Error as e:
        raise ConfigError(path, "", f"invalid ini file: {e}") from None
    data: dict[str, Any] = {}
    for section in parser.sections():
        items = dict(parser.items(section))
        if section == "pgbouncer":
            data.setdefault("pgbouncer", {}).update({k.lower(): v for k, v in items.items()})
        elif section == "databases":
            data["databases"] = {k.strip('"'): v for k, v in items.items()}
        else:
            data.setdefault(section, {}).update(items)
    return _from_dict(data, path, env, from_text=True)


def _build_from_text(b: _Builder, data: dict[str, Any]) -> Config:
    cfg = Config()
    owner = {}
    for sec, cls in SECTIONS.items():
        for k in _hints(cls):
            owner.setdefault(k, sec)
    for name, values in data.items():
        if name == "pgbouncer":
            for key, value in values.items():
                sec = owner.get(key)
                if sec is not None and sec != "tview":
                    b.section(sec, SECTIONS[sec], {key: value}, getattr(cfg, sec), from_text=True)
                elif key in PGBOUNCER_GLOBAL_SETTINGS:
                    b.warn(
                        b.source,
                        f"pgbouncer.{key}",
                        "PgBouncer setting not implemented by tvproxy; ignored",
                    )
                else:
                    raise ConfigError(b.source, f"pgbouncer.{key}", "unknown key")
        elif name == "databases":
            for dbname, connstr in values.items():
                if dbname == "*":
                    b.warn(
                        b.source,
                        "databases.*",
                        "fallback database not implemented by tvproxy; ignored",
                    )
                    continue
                cfg.databases[dbname] = b.database(dbname, {"dsn": connstr}, from_text=True)
        elif name in PGBOUNCER_SECTIONS_IGNORED:
            b.warn(
                b.source, name, f"PgBouncer [{name}] section not implemented by tvproxy; ignored"
            )
        else:
            raise ConfigError(b.source, name, "unknown section")
    if "pool_mode" not in data.get("pgbouncer", {}):
        # PgBouncer's default is session; keep the imported file's meaning.
        cfg.proxy.pool_mode = "session"
    return cfg


# --------------------------------------------------------------------------------------------
# Runtime: admin console SET and SHOW CONFIG


def validate_for_serve(cfg: Config) -> None:
    """Checks that only matter when actually serving (a file may be valid yet unservable)."""
    if not cfg.databases:
        raise ConfigError(
            cfg.path or "<config>",
            "databases",
            "no database configured: add a [databases.<name>] table with host/port/dbname "
            "(or dsn), or run `tvproxy demo` for a throwaway PostgreSQL behind the proxy",
        )


def _runtime_sections(cfg: Config) -> list[tuple[str, Any]]:
    return [("proxy", cfg.proxy), ("auth", cfg.auth), ("admin", cfg.admin)]


def set_runtime_value(cfg: Config, key: str, value: str) -> None:
    """Apply the admin console's ``SET key = value`` (bare key of [proxy]/[auth]/[admin])."""
    key = key.strip().lower()
    for _sec, obj in _runtime_sections(cfg):
        hints = _hints(type(obj))
        if key in hints:
            if key in NOT_CHANGEABLE:
                raise ConfigError(
                    "SET", key, "cannot be changed at runtime; edit the config and restart"
                )
            new = _convert("SET", key, key, hints[key], value, True)
            if key == "auth_file" and new and not os.path.isabs(new):
                base = os.path.dirname(cfg.path) if cfg.path else os.getcwd()
                new = os.path.normpath(os.path.join(base, new))
            setattr(obj, key, new)
            return
    if key in PGBOUNCER_GLOBAL_SETTINGS:
        raise ConfigError("SET", key, "PgBouncer setting not implemented by tvproxy")
    raise ConfigError("SET", key, "unknown configuration key")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        return ",".join(value)
    if value is None:
        return ""
    return str(value)


def config_rows(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(key, value, default, changeable) rows for SHOW CONFIG, sorted by key like PgBouncer."""
    rows = []
    for _sec, obj in _runtime_sections(cfg):
        default = type(obj)()
        for f in dataclasses.fields(obj):
            changeable = "no" if f.name in NOT_CHANGEABLE else "yes"
            rows.append(
                (f.name, _fmt(getattr(obj, f.name)), _fmt(getattr(default, f.name)), changeable)
            )
    default_tv = TviewConfig()
    for f in dataclasses.fields(cfg.tview):
        rows.append(
            (
                f"tview.{f.name}",
                _fmt(getattr(cfg.tview, f.name)),
                _fmt(getattr(default_tv, f.name)),
                "no",
            )
        )
    rows.append(("conffile", cfg.path or "", "", "no"))
    rows.sort(key=lambda r: r[0])
    return rows
