"""tvproxy.config: parsing, validation, one-line errors, env overrides, dsn, runtime SET."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tvproxy.config import (
    PGBOUNCER_GLOBAL_SETTINGS,
    Config,
    ConfigError,
    DatabaseConfig,
    ProxyConfig,
    config_rows,
    load_config,
    parse_config,
    parse_dsn,
    set_runtime_value,
    validate_for_serve,
)

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[proxy]
listen_addr = "127.0.0.1"
listen_port = 6432
pool_mode = "transaction"
default_pool_size = 20
max_client_conn = 1000
[auth]
auth_type = "trust"          # trust | md5 | scram-sha-256
# auth_file = "conf/userlist.txt"
[admin]
admin_users = ["postgres"]
stats_users = []
[databases.app]
host = "127.0.0.1"
port = 5432
dbname = "app"
user = "postgres"
# password = "..."  pool_size = 20
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "conf/x.toml", env=env or {})


def error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as ei:
        parse(text, env)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# -- the minimal example and defaults ---------------------------------------------------------


def test_minimal_example_parses() -> None:
    cfg = parse(MINIMAL)
    assert cfg.proxy.listen_addr == "127.0.0.1"
    assert cfg.proxy.listen_port == 6432
    assert cfg.proxy.pool_mode == "transaction"
    assert cfg.proxy.default_pool_size == 20
    assert cfg.proxy.max_client_conn == 1000
    assert cfg.auth.auth_type == "trust"
    assert cfg.admin.admin_users == ["postgres"]
    assert cfg.admin.stats_users == []
    db = cfg.databases["app"]
    assert (db.name, db.host, db.port, db.dbname, db.user) == (
        "app",
        "127.0.0.1",
        5432,
        "app",
        "postgres",
    )
    assert db.pool_size is None and db.pool_mode is None
    assert cfg.warnings == []
    assert cfg.path == os.path.abspath("conf/x.toml")
    validate_for_serve(cfg)


def test_empty_file_gives_defaults() -> None:
    cfg = parse("")
    assert cfg.proxy == ProxyConfig()
    assert cfg.proxy.max_packet_size == 1 << 30
    assert cfg.auth.auth_type == "scram-sha-256"
    assert cfg.tview.lock_namespace == 0x7476
    assert cfg.databases == {}


def test_example_config_file_loads() -> None:
    cfg = load_config(str(REPO / "conf" / "tvproxy.toml"), env={})
    assert cfg.warnings == []
    assert list(cfg.databases) == ["app"]
    assert cfg.path == str(REPO / "conf" / "tvproxy.toml")


def test_dbname_defaults_to_name_and_floats_accept_ints() -> None:
    cfg = parse(
        """
        [proxy]
        server_lifetime = 10
        query_wait_timeout = 0.5
        [databases.shop]
        host = "db"
        """
    )
    assert cfg.databases["shop"].dbname == "shop"
    assert cfg.proxy.server_lifetime == 10.0 and isinstance(cfg.proxy.server_lifetime, float)
    assert cfg.proxy.query_wait_timeout == 0.5


def test_auth_file_relative_to_config_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "t.toml"
    f.write_text('[auth]\nauth_file = "users.txt"\n')
    cfg = load_config(str(f), env={})
    assert cfg.auth.auth_file == str(tmp_path / "sub" / "users.txt")
    f.write_text('[auth]\nauth_file = "/etc/tvproxy/users.txt"\n')
    assert load_config(str(f), env={}).auth.auth_file == "/etc/tvproxy/users.txt"


def test_empty_databases_table_parses_but_cannot_serve() -> None:
    cfg = parse("[databases]\n")
    assert cfg.databases == {}
    with pytest.raises(ConfigError) as ei:
        validate_for_serve(cfg)
    msg = str(ei.value)
    assert "tvproxy demo" in msg and "\n" not in msg
    assert msg.startswith(os.path.abspath("conf/x.toml") + ": databases: ")


# -- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[proxy]\nlisten_port = "abc"',
            "conf/x.toml: proxy.listen_port: expected an integer, got 'abc'",
        ),
        ("[proxy]\nlisten_port = 0", "conf/x.toml: proxy.listen_port: expected a port number"),
        ("[proxy]\nlisten_port = 70000", "conf/x.toml: proxy.listen_port: expected a port number"),
        ("[proxy]\nlisten_port = true", "proxy.listen_port: expected an integer, got true"),
        ("[proxy]\nlisten_port = 1.5", "proxy.listen_port: expected an integer, got 1.5"),
        ('[proxy]\npool_mode = "bogus"', "proxy.pool_mode: expected one of transaction, session"),
        ('[proxy]\npool_mode = "statement"', "proxy.pool_mode: statement pooling is not supported"),
        ('[auth]\nauth_type = "ldap"', "auth.auth_type: expected one of trust, md5, scram-sha-256"),
        (
            '[tview]\nopaque_writes = "ignore"',
            "tview.opaque_writes: expected one of refresh, reject",
        ),
        ("[proxy]\ndefault_pool_size = -1", "proxy.default_pool_size: must not be negative"),
        ("[proxy]\nquery_wait_timeout = -0.5", "proxy.query_wait_timeout: must not be negative"),
        ('[proxy]\nserver_lifetime = "1h"', "proxy.server_lifetime: expected a number of seconds"),
        ("[proxy]\nworkers = 0", "proxy.workers: must be at least 1"),
        ('[proxy]\ntcp_keepalive = "yes"', "proxy.tcp_keepalive: expected a boolean"),
        ("[admin]\nadmin_users = [1]", "admin.admin_users: expected a list of strings"),
        ("[admin]\nmetrics_port = -1", "admin.metrics_port: expected a port number"),
        ('[tview]\nschema = "a b"', "tview.schema: expected a plain SQL identifier"),
        ("[tview]\nmax_propagation_depth = 0", "tview.max_propagation_depth: must be at least 1"),
        ("[databases.app]\nport = 0", "databases.app.port: expected a port number"),
        ('[databases.app]\npool_mode = "x"', "databases.app.pool_mode: expected one of"),
        ("[databases.app]\npool_size = -2", "databases.app.pool_size: must not be negative"),
        (
            "[databases.tvproxy]\nhost = 'x'",
            "databases.tvproxy: database name 'tvproxy' is reserved",
        ),
        ("[databases.pgbouncer]\nhost = 'x'", "databases.pgbouncer: database name 'pgbouncer' is"),
        ("[databases]\napp = 5", "databases.app: expected a table or a connection string"),
        ("proxy = 5", "conf/x.toml: proxy: expected a table [proxy], got 5"),
    ],
)
def test_bad_values(text: str, expected: str) -> None:
    assert expected in error(text)


def test_bad_toml_names_the_line() -> None:
    msg = error('[proxy]\nlisten_port = 6432\npool_mode = "transaction\n')
    assert msg.startswith("conf/x.toml: line 3: invalid TOML: ")


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config("/nonexistent/tvproxy.toml", env={})
    assert str(ei.value) == (
        "/nonexistent/tvproxy.toml: cannot read config file: No such file or directory"
    )


# -- unknown keys and PgBouncer keys ------------------------------------------------------------


def test_unknown_key_is_an_error() -> None:
    assert error("[proxy]\nlisten_prot = 6432") == "conf/x.toml: proxy.listen_prot: unknown key"
    assert error("[auth]\nfoo = 1") == "conf/x.toml: auth.foo: unknown key"
    assert error("[databases.app]\nhots = 'x'") == "conf/x.toml: databases.app.hots: unknown key"
    assert "unknown section" in error("[proxi]\nlisten_port = 1")
    assert "unknown key" in error("listen_port = 1")


def test_key_in_the_wrong_section_says_where_it_belongs() -> None:
    assert error('[proxy]\nauth_type = "md5"') == (
        "conf/x.toml: proxy.auth_type: unknown key; auth_type belongs in [auth]"
    )


def test_pgbouncer_keys_warn() -> None:
    cfg = parse(
        """
        [proxy]
        server_round_robin = 1
        so_reuseport = true
        pkt_buf = 4096
        client_tls_sslmode = "disable"
        [auth]
        auth_query = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
        [databases.app]
        host = "h"
        connect_query = "select 1"
        [users]
        bob = "pool_mode=session"
        """
    )
    joined = "\n".join(cfg.warnings)
    for key in (
        "proxy.server_round_robin",
        "proxy.so_reuseport",
        "proxy.pkt_buf",
        "proxy.client_tls_sslmode",
        "auth.auth_query",
        "databases.app.connect_query",
    ):
        assert f"conf/x.toml: {key}: PgBouncer setting not implemented" in joined
    assert "conf/x.toml: users: PgBouncer [users] section" in joined
    assert all("\n" not in w for w in cfg.warnings)


def test_every_pgbouncer_global_is_known() -> None:
    implemented = set(ProxyConfig.__dataclass_fields__) | {
        "auth_type",
        "auth_file",
        "admin_users",
        "stats_users",
    }
    for key in sorted(PGBOUNCER_GLOBAL_SETTINGS - implemented):
        cfg = parse(f"[proxy]\n{key} = 1\n")
        assert any(key in w for w in cfg.warnings), key


# -- environment overrides ----------------------------------------------------------------------


def test_env_overrides() -> None:
    cfg = parse(
        MINIMAL,
        env={
            "TVPROXY_PROXY_LISTEN_PORT": "7000",
            "TVPROXY_PROXY_TCP_KEEPALIVE": "off",
            "TVPROXY_PROXY_SERVER_LIFETIME": "12.5",
            "TVPROXY_AUTH_AUTH_TYPE": "md5",
            "TVPROXY_ADMIN_ADMIN_USERS": "alice, bob",
            "TVPROXY_TVIEW_ENABLED": "false",
            "TVPROXY_DATABASES_APP_POOL_SIZE": "7",
            "TVPROXY_DATABASES_APP_MAX_DB_CONNECTIONS": "9",
            "TVPROXY_TEST_DSN": "not configuration",
            "UNRELATED": "x",
        },
    )
    assert cfg.proxy.listen_port == 7000
    assert cfg.proxy.tcp_keepalive is False
    assert cfg.proxy.server_lifetime == 12.5
    assert cfg.auth.auth_type == "md5"
    assert cfg.admin.admin_users == ["alice", "bob"]
    assert cfg.tview.enabled is False
    assert cfg.databases["app"].pool_size == 7
    assert cfg.databases["app"].max_db_connections == 9


def test_env_can_add_a_database() -> None:
    cfg = parse(
        "",
        env={
            "TVPROXY_DATABASES_MY_APP_DSN": "postgresql://u:pw@db.internal:5433/real",
            "TVPROXY_DATABASES_MY_APP_POOL_SIZE": "3",
        },
    )
    db = cfg.databases["my_app"]
    assert (db.host, db.port, db.dbname, db.user, db.password, db.pool_size) == (
        "db.internal",
        5433,
        "real",
        "u",
        "pw",
        3,
    )
    validate_for_serve(cfg)


def test_env_bad_value_names_the_variable() -> None:
    msg = error(MINIMAL, env={"TVPROXY_PROXY_LISTEN_PORT": "abc"})
    assert msg == "$TVPROXY_PROXY_LISTEN_PORT: proxy.listen_port: expected an integer, got 'abc'"
    msg = error(MINIMAL, env={"TVPROXY_PROXY_NOPE": "1"})
    assert msg == "$TVPROXY_PROXY_NOPE: proxy.nope: unknown key"


def test_load_config_uses_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "t.toml"
    f.write_text(MINIMAL)
    monkeypatch.setenv("TVPROXY_PROXY_LISTEN_PORT", "6543")
    assert load_config(str(f)).proxy.listen_port == 6543
    assert load_config(str(f), env={}).proxy.listen_port == 6432


# -- dsn ----------------------------------------------------------------------------------------


def test_dsn_uri() -> None:
    cfg = parse(
        """
        [databases.app]
        dsn = "postgresql://bob:s%40cret@db.example:5433/appdb?application_name=x"
        """
    )
    db = cfg.databases["app"]
    assert (db.host, db.port, db.dbname, db.user, db.password) == (
        "db.example",
        5433,
        "appdb",
        "bob",
        "s@cret",
    )
    assert any("databases.app.dsn.application_name" in w for w in cfg.warnings)


def test_dsn_key_value_and_explicit_keys_win() -> None:
    cfg = parse(
        r"""
        [databases.app]
        dsn = "host=h1 port=6000 dbname='my db' user=u password='it\\'s' pool_size=3"
        port = 6001
        """
    )
    db = cfg.databases["app"]
    assert (db.host, db.port, db.dbname, db.user, db.password, db.pool_size) == (
        "h1",
        6001,
        "my db",
        "u",
        "it's",
        3,
    )


def test_dsn_as_a_plain_string_value() -> None:
    cfg = parse('[databases]\napp = "host=localhost dbname=bazdb"\n')
    assert cfg.databases["app"].dbname == "bazdb"
    assert cfg.databases["app"].host == "localhost"


def test_dsn_errors() -> None:
    assert "databases.app.dsn.port: expected an integer" in error(
        '[databases.app]\ndsn = "postgresql://h:abc/db"'
    )
    assert "databases.app.dsn: unterminated quoted value" in error(
        '[databases.app]\ndsn = "host=\'h"'
    )
    assert "databases.app.dsn.bogus: unknown connection parameter" in error(
        '[databases.app]\ndsn = "host=h bogus=1"'
    )


def test_parse_dsn_forms() -> None:
    assert parse_dsn("postgres://[::1]:5433/db") == {"host": "::1", "port": "5433", "dbname": "db"}
    assert parse_dsn("postgresql:///db?host=/tmp") == {"dbname": "db", "host": "/tmp"}
    assert parse_dsn("  host = a   port=1 ") == {"host": "a", "port": "1"}
    assert parse_dsn("") == {}
    with pytest.raises(ValueError):
        parse_dsn("host")


# -- pgbouncer.ini import -----------------------------------------------------------------------


def test_pgbouncer_ini_import(tmp_path: Path) -> None:
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        textwrap.dedent(
            """
            [databases]
            app = host=127.0.0.1 port=5433 dbname=real pool_size=5
            * = host=localhost

            [pgbouncer]
            listen_addr = *
            listen_port = 6433
            auth_type = md5
            auth_file = userlist.txt
            admin_users = postgres, admin
            logfile = /var/log/pgbouncer.log
            """
        )
    )
    cfg = load_config(str(ini), env={})
    assert cfg.proxy.listen_addr == "*"
    assert cfg.proxy.listen_port == 6433
    assert cfg.proxy.pool_mode == "session"  # PgBouncer's default when the file says nothing
    assert cfg.auth.auth_type == "md5"
    assert cfg.auth.auth_file == str(tmp_path / "userlist.txt")
    assert cfg.admin.admin_users == ["postgres", "admin"]
    db = cfg.databases["app"]
    assert (db.host, db.port, db.dbname, db.pool_size) == ("127.0.0.1", 5433, "real", 5)
    assert any("pgbouncer.logfile" in w for w in cfg.warnings)
    assert any("databases.*" in w for w in cfg.warnings)


# -- runtime SET and SHOW CONFIG ----------------------------------------------------------------


def test_set_runtime_value() -> None:
    cfg = parse(MINIMAL)
    set_runtime_value(cfg, "default_pool_size", "7")
    set_runtime_value(cfg, "query_wait_timeout", "3.5")
    set_runtime_value(cfg, "pool_mode", "session")
    set_runtime_value(cfg, "auth_type", "md5")
    set_runtime_value(cfg, "stats_users", "a,b")
    set_runtime_value(cfg, "TCP_KEEPALIVE", "0")
    assert cfg.proxy.default_pool_size == 7
    assert cfg.proxy.query_wait_timeout == 3.5
    assert cfg.proxy.pool_mode == "session"
    assert cfg.auth.auth_type == "md5"
    assert cfg.admin.stats_users == ["a", "b"]
    assert cfg.proxy.tcp_keepalive is False


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("nope", "1", "SET: nope: unknown configuration key"),
        ("default_pool_size", "x", "SET: default_pool_size: expected an integer, got 'x'"),
        ("pool_mode", "statement", "SET: pool_mode: statement pooling is not supported"),
        ("listen_port", "7000", "SET: listen_port: cannot be changed at runtime"),
        ("server_round_robin", "1", "SET: server_round_robin: PgBouncer setting not implemented"),
    ],
)
def test_set_runtime_value_errors(key: str, value: str, expected: str) -> None:
    cfg = parse(MINIMAL)
    before = cfg.proxy.default_pool_size
    with pytest.raises(ConfigError) as ei:
        set_runtime_value(cfg, key, value)
    assert str(ei.value).startswith(expected)
    assert cfg.proxy.default_pool_size == before


def test_config_rows() -> None:
    cfg = parse(MINIMAL)
    rows = {r[0]: r[1:] for r in config_rows(cfg)}
    assert rows["listen_port"] == ("6432", "6432", "no")
    assert rows["max_client_conn"] == ("1000", "100", "yes")
    assert rows["tcp_keepalive"] == ("1", "1", "yes")
    assert rows["server_lifetime"] == ("3600", "3600", "yes")
    assert rows["reserve_pool_timeout"] == ("5", "5", "yes")
    assert rows["admin_users"] == ("postgres", "", "yes")
    assert rows["auth_type"] == ("trust", "scram-sha-256", "yes")
    assert rows["tview.enabled"][0] == "1"
    assert all(len(r) == 4 and all(isinstance(x, str) for x in r) for r in config_rows(cfg))
    keys = [r[0] for r in config_rows(cfg)]
    assert keys == sorted(keys)


def test_database_config_constructor_defaults() -> None:
    db = DatabaseConfig(name="x")
    assert (db.host, db.port, db.dbname, db.max_db_connections, db.dsn) == (
        "127.0.0.1",
        5432,
        "",
        0,
        "",
    )
