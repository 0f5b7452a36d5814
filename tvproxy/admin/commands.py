"""Admin console commands: parsing, permissions, and the PgBouncer-compatible result sets.

Column names, order and kinds follow PgBouncer 1.2x (``src/admin.c`` and ``src/stats.c``) so
that PgBouncer tooling (prometheus-pgbouncer-exporter, pgbouncer_fdw, dashboards) reads tvproxy
unchanged.  Integer columns are sent as int8 (drivers hand them out as integers), everything else
as text.  Nothing here does I/O: a command returns a :class:`Result` that the console renders
for the simple or the extended protocol; a command that has to wait (``PAUSE``, ``WAIT_CLOSE``)
returns a ``wait`` predicate that the console polls before answering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tvproxy import __version__
from tvproxy.admin import pending
from tvproxy.config import (
    NOT_CHANGEABLE,
    PGBOUNCER_GLOBAL_SETTINGS,
    RESERVED_DATABASES,
    ConfigError,
    config_rows,
    set_runtime_value,
)
from tvproxy.log import get_logger
from tvproxy.protocol import build as B
from tvproxy.stats import STAT_FIELDS

if TYPE_CHECKING:
    from tvproxy.admin.console import AdminSession
    from tvproxy.pool.pool import Pool
    from tvproxy.server import ProxyServer

log = get_logger("tvproxy.admin")

TEXT = B.TEXT_OID
INT = B.INT8_OID
BYTEA = 17

# The PgBouncer release whose console this one mirrors; SHOW VERSION leads with it so tools that
# look for "PgBouncer x.y.z" (exporters, Datadog) pick the feature level they know.
PGBOUNCER_COMPAT = "1.25.0"
VERSION_STRING = f"PgBouncer {PGBOUNCER_COMPAT} compatible (tvproxy {__version__})"

Columns = Sequence[tuple[str, int]]


class AdminError(Exception):
    """A command failed: becomes an ErrorResponse with this SQLSTATE."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail


@dataclass(frozen=True)
class Command:
    text: str  # the statement as typed (for error messages)
    verb: str  # lower case: show, set, pause, resume, ...
    arg: str = ""  # SHOW subject (lower case), database name, client id, SHUTDOWN mode, SET key
    value: str = ""  # SET value


@dataclass
class Result:
    tag: str
    columns: Columns | None = None  # None: no RowDescription (NoData)
    rows: list[Sequence[Any]] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)
    wait: Callable[[], bool] | None = None  # polled until True before the answer is sent
    silent: bool = False  # immediate SHUTDOWN: no answer, the connection ends with the process
    after: Callable[[], None] | None = None  # run once the answer is on its way (SHUTDOWN)


def _cols(spec: str) -> list[tuple[str, int]]:
    """``"name:s other:i"`` -> [(name, TEXT), (other, INT8)] (``b`` = bytea)."""
    kinds = {"s": TEXT, "i": INT, "b": BYTEA}
    out = []
    for item in spec.split():
        name, _, kind = item.partition(":")
        out.append((name, kinds[kind or "s"]))
    return out


# --- column sets -------------------------------------------------------------------------------

POOLS = _cols(
    "database user cl_active:i cl_waiting:i cl_active_cancel_req:i cl_waiting_cancel_req:i "
    "sv_active:i sv_active_cancel:i sv_being_canceled:i sv_idle:i sv_used:i sv_tested:i "
    "sv_login:i maxwait:i maxwait_us:i pool_mode load_balance_hosts"
)
STATS = [("database", TEXT)] + [
    (n, INT)
    for n in (
        "total_server_assignment_count", "total_xact_count", "total_query_count",
        "total_received", "total_sent", "total_xact_time", "total_query_time",
        "total_wait_time", "total_client_parse_count", "total_server_parse_count",
        "total_bind_count", "total_client_login_count",
        "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv",
        "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time",
        "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
        "avg_client_login_count",
    )
]
STATS_TOTALS = [("database", TEXT)] + [(n, INT) for n in STAT_FIELDS]
STATS_AVERAGES = [("database", TEXT)] + [
    (n, INT)
    for n in (
        "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time", "avg_client_parse_count",
        "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
    )
]
TOTALS = _cols("name value:i")
# SHOW TOTALS row names are PgBouncer's internal counter names (client_bytes = received from
# clients, server_bytes = sent to them, ps_* = prepared statements).
TOTALS_NAMES = (
    ("server_assignment_count", "server_assignment_count"), ("xact_count", "xact_count"),
    ("query_count", "query_count"), ("client_bytes", "bytes_received"),
    ("server_bytes", "bytes_sent"), ("xact_time", "xact_time"), ("query_time", "query_time"),
    ("wait_time", "wait_time"), ("ps_client_parse_count", "client_parse_count"),
    ("ps_server_parse_count", "server_parse_count"), ("ps_bind_count", "bind_count"),
    ("client_login_count", "client_login_count"),
)
SOCKETS_STD = _cols(
    "type user database replication state addr port:i local_addr local_port:i connect_time "
    "request_time wait:i wait_us:i close_needed:i ptr link remote_pid:i tls application_name "
    "prepared_statements:i id:i"
)
SOCKETS_DEBUG = SOCKETS_STD + _cols(
    "recv_pos:i pkt_pos:i pkt_remain:i send_pos:i send_remain:i pkt_avail:i send_avail:i"
)
DATABASES = _cols(
    "name host port:i database force_user pool_size:i min_pool_size:i reserve_pool_size:i "
    "server_lifetime:i pool_mode load_balance_hosts max_connections:i current_connections:i "
    "max_client_connections:i current_client_connections:i paused:i disabled:i"
)
USERS = _cols(
    "name pool_size reserve_pool_size pool_mode max_user_connections:i current_connections:i "
    "max_user_client_connections:i current_client_connections:i"
)
CONFIG = _cols("key value default changeable")
LISTS = _cols("list items:i")
VERSION = _cols("version")
STATE = _cols("key value")
MEM = _cols("name size:i used:i free:i memtotal:i")
DNS_HOSTS = _cols("hostname ttl:i addrs")
DNS_ZONES = _cols("zonename serial:i count:i")
PEERS = _cols("peer_id:i host port:i pool_size:i")
PEER_POOLS = _cols(
    "peer_id:i cl_active_cancel_req:i cl_waiting_cancel_req:i sv_active_cancel:i sv_login:i"
)
FDS = _cols(
    "fd:i task user database addr port:i cancel:i link:i client_encoding std_strings "
    "datestyle timezone password scram_client_key:b scram_server_key:b"
)
TVIEWS = _cols(
    "database tview entity pk_column sources depends_on strategy rows:i created_at"
)
TVIEW_STATS = _cols(
    "database tview commits:i keys_enqueued:i keys_coalesced:i rows_refreshed:i "
    "rows_deleted:i cascade_rows:i full_refreshes:i refresh_statements:i errors:i "
    "total_refresh_us:i avg_refresh_us:i max_refresh_us:i last_refresh_at"
)
TVIEW_QUEUE = _cols("client_id:i database entity keys:i savepoint_depth:i age_us:i")
TVIEW_PENDING = _cols("gid database keys prepared_at state")  # see admin/pending.py

HELP_TEXT = "\n".join((
    "",
    "\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION",
    "\tSHOW PEERS|PEER_POOLS",
    "\tSHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE",
    "\tSHOW DNS_HOSTS|DNS_ZONES",
    "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
    "\tSHOW TVIEWS|TVIEW STATS|TVIEW QUEUE|TVIEW PENDING",
    "\tSET key = arg",
    "\tRELOAD",
    "\tPAUSE [<db>]",
    "\tRESUME [<db>]",
    "\tDISABLE <db>",
    "\tENABLE <db>",
    "\tRECONNECT [<db>]",
    "\tKILL [<db>]",
    "\tKILL_CLIENT <client_id>",
    "\tSUSPEND",
    "\tSHUTDOWN",
    "\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS",
    "\tWAIT_CLOSE [<db>]",
))

# Session settings some drivers SHOW or SET on connect (PgBouncer answers these with fixed values
# and ignores the SETs).  Values come from the admin welcome where it has them.
FAKE_PARAMS = {
    "client_encoding": "UTF8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO, MDY",
    "timezone": "UTC",
    "extra_float_digits": "2",
    "application_name": "",
}

# --- parsing -----------------------------------------------------------------------------------

WORD, IDENT, STRING, EQUALS = "word", "ident", "string", "="
Token = tuple[str, str]


def _syntax_error(text: str) -> AdminError:
    return AdminError("42601", f"invalid command '{text}', use SHOW HELP;")


def split_statements(sql: str) -> list[tuple[str, list[Token]]]:
    """Split on top-level ``;`` into (statement text, tokens); comments are dropped.

    Tokens: bare words, "quoted identifiers" and 'strings' (unescaped), and ``=``.
    """
    out: list[tuple[str, list[Token]]] = []
    tokens: list[Token] = []
    start = 0
    i = 0
    n = len(sql)

    def finish(end: int) -> None:
        if tokens:
            out.append((sql[start:end].strip(), list(tokens)))
        tokens.clear()

    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif c == ";":
            finish(i)
            i += 1
            start = i
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise AdminError("42601", "unterminated /* comment")
            i = j + 2
        elif c in "\"'":
            j = i + 1
            parts = []
            while True:
                k = sql.find(c, j)
                if k < 0:
                    what = "quoted identifier" if c == '"' else "quoted string"
                    raise AdminError("42601", f"unterminated {what}")
                parts.append(sql[j:k])
                if sql.startswith(c, k + 1):  # doubled quote
                    parts.append(c)
                    j = k + 2
                    continue
                i = k + 1
                break
            tokens.append((IDENT if c == '"' else STRING, "".join(parts)))
        elif c == "=":
            tokens.append((EQUALS, "="))
            i += 1
        else:
            j = i
            while j < n and not sql[j].isspace() and sql[j] not in ";=\"'":
                j += 1
            tokens.append((WORD, sql[i:j]))
            i = j
    finish(n)
    return out


SHOW_SUBJECTS: dict[str, Columns] = {
    "pools": POOLS, "stats": STATS, "stats_totals": STATS_TOTALS,
    "stats_averages": STATS_AVERAGES, "totals": TOTALS, "clients": SOCKETS_STD,
    "servers": SOCKETS_STD, "sockets": SOCKETS_DEBUG, "active_sockets": SOCKETS_DEBUG,
    "databases": DATABASES, "users": USERS, "config": CONFIG, "lists": LISTS,
    "version": VERSION, "state": STATE, "mem": MEM, "dns_hosts": DNS_HOSTS,
    "dns_zones": DNS_ZONES, "peers": PEERS, "peer_pools": PEER_POOLS, "fds": FDS,
    "tviews": TVIEWS, "tview stats": TVIEW_STATS, "tview queue": TVIEW_QUEUE,
    "tview pending": TVIEW_PENDING,
}
NO_ARG = frozenset({"reload", "suspend"})
OPTIONAL_ARG = frozenset({"pause", "resume", "reconnect", "kill", "wait_close"})
ONE_ARG = frozenset({"disable", "enable", "kill_client"})
SHUTDOWN_MODES = ("WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS")


def _is_name(tok: Token) -> bool:
    return tok[0] in (WORD, IDENT)


def parse_statement(text: str, tokens: list[Token]) -> Command:
    if not tokens or not _is_name(tokens[0]):
        raise _syntax_error(text)
    verb = tokens[0][1].lower()
    rest = tokens[1:]
    if verb == "set":
        if (
            len(rest) == 3
            and _is_name(rest[0])
            and (rest[1][0] == EQUALS or rest[1] == (WORD, rest[1][1]) and rest[1][1].lower() == "to")
            and rest[2][0] in (WORD, IDENT, STRING)
        ):
            key = rest[0][1].lower() if rest[0][0] == WORD else rest[0][1]
            if not key:
                raise AdminError("42601", "bad arguments")
            return Command(text, "set", key, rest[2][1])
        raise _syntax_error(text)
    if any(not _is_name(t) for t in rest):
        raise _syntax_error(text)
    words = [t[1] for t in rest]
    if verb in ("show", "select"):  # PgBouncer routes SELECT x to SHOW x
        subject = " ".join(w.lower() for w in words)
        if subject in SHOW_SUBJECTS or len(words) == 1 and (subject == "help" or subject in FAKE_PARAMS):
            return Command(text, "show", subject)
        raise _syntax_error(text)
    if verb in NO_ARG and not words:
        return Command(text, verb)
    if verb in OPTIONAL_ARG and len(words) <= 1 or verb in ONE_ARG and len(words) == 1:
        return Command(text, verb, words[0] if words else "")
    if verb == "shutdown" and len(words) <= 1:
        mode = words[0].upper() if words else ""
        if mode and mode not in SHUTDOWN_MODES:
            raise _syntax_error(text)
        return Command(text, verb, mode)
    raise _syntax_error(text)


def parse_query(sql: str) -> list[Command]:
    """A Query string -> its commands (empty for an empty query); AdminError on bad syntax."""
    return [parse_statement(text, tokens) for text, tokens in split_statements(sql)]


def describe(cmd: Command) -> Columns | None:
    """The columns a command returns (None: it returns no rows)."""
    if cmd.verb != "show" or cmd.arg == "help":
        return None
    if cmd.arg in FAKE_PARAMS:
        return [(cmd.arg, TEXT)]
    return SHOW_SUBJECTS[cmd.arg]


# --- helpers -----------------------------------------------------------------------------------

def _ts(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _epoch(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


def _split_us(seconds: float) -> tuple[int, int]:
    us = max(int(seconds * 1e6), 0)
    return us // 1_000_000, us % 1_000_000


def _ptr(obj: object | None) -> str:
    return "" if obj is None else f"0x{id(obj):x}"


def _notice(message: str, detail: str = "") -> bytes:
    parts = [b"SNOTICE\x00", b"VNOTICE\x00", b"C00000\x00", b"M", B.cstr(message)]
    if detail:
        parts += [b"D", B.cstr(detail)]
    parts.append(b"\x00")
    return B.message(b"N", b"".join(parts))


def _admin_db(name: str) -> bool:
    return name in RESERVED_DATABASES


# --- SHOW --------------------------------------------------------------------------------------

def _pools_by_db(proxy: ProxyServer, db: str | None) -> list[Pool]:
    return [p for (d, _), p in proxy.pools.items() if db is None or d == db]


def show_pools(proxy: ProxyServer) -> list[tuple]:
    now = time.monotonic()
    active: dict[int, int] = {}
    for client in proxy.clients:
        if client.pool is not None and client.ready and not client.waiting:
            active[id(client.pool)] = active.get(id(client.pool), 0) + 1
    rows = []
    for (dbname, user), pool in sorted(proxy.pools.items()):
        waiters = [c for c in pool.waiters if not c.closed]
        maxwait, maxwait_us = _split_us(now - waiters[0].wait_started) if waiters else (0, 0)
        used = sum(1 for s in pool.idle if s.needs_check)  # idle past server_check_delay
        rows.append((
            dbname, user, active.get(id(pool), 0), len(waiters), 0, 0,
            len(pool.active), 0, 0, len(pool.idle) - used, used, len(pool.cleaning),
            pool.connecting, maxwait, maxwait_us, pool.pool_mode, None,
        ))
    admins: dict[tuple[str, str], int] = {}
    for client in proxy.clients:
        if client.admin is not None and client.ready:
            key = (client.database, client.user)
            admins[key] = admins.get(key, 0) + 1
    for (dbname, user), count in sorted(admins.items()):
        rows.append((dbname, user, count, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "statement", None))
    return rows


def _stat_items(proxy: ProxyServer) -> list[tuple[str, dict[str, int], dict[str, int]]]:
    out = []
    for name, st in sorted(proxy.stats.dbs.items()):
        avg = st.averages
        out.append((name, st.totals(), {k: int(avg.get(k, 0)) for k in STAT_FIELDS}))
    return out


def show_stats(proxy: ProxyServer) -> list[tuple]:
    return [
        (name, *(tot[k] for k in STAT_FIELDS), *(avg[k] for k in STAT_FIELDS))
        for name, tot, avg in _stat_items(proxy)
    ]


def show_stats_totals(proxy: ProxyServer) -> list[tuple]:
    return [(name, *(tot[k] for k in STAT_FIELDS)) for name, tot, _ in _stat_items(proxy)]


def show_stats_averages(proxy: ProxyServer) -> list[tuple]:
    return [(name, *(avg[k] for k in STAT_FIELDS)) for name, _, avg in _stat_items(proxy)]


def show_totals(proxy: ProxyServer) -> list[tuple]:
    tot = dict.fromkeys(STAT_FIELDS, 0)
    avg = dict.fromkeys(STAT_FIELDS, 0)
    for _, t, a in _stat_items(proxy):
        for k in STAT_FIELDS:
            tot[k] += t[k]
            avg[k] += a[k]
    rows = [(f"total_{label}", tot[k]) for label, k in TOTALS_NAMES]
    rows += [(f"avg_{label}", avg[k]) for label, k in TOTALS_NAMES]
    return rows


def _addr(addr: tuple[str, int], proxy: ProxyServer) -> tuple[str, int]:
    if not addr or not addr[0]:
        return "unix", proxy.cfg.proxy.listen_port
    return addr[0], addr[1]


def _client_rows(proxy: ProxyServer, debug: bool = False) -> list[tuple[str, tuple]]:
    """(socket-list state, row) for every logged-in client and every login in progress."""
    now = time.monotonic()
    out = []
    for client in sorted(proxy.clients, key=lambda c: c.id):
        state = client.state
        wait = now - client.wait_started if state == "waiting" else 0.0
        addr, port = _addr(client.addr, proxy)
        laddr, lport = _addr(client.local_addr, proxy)
        row: tuple = (
            "C", client.user or "(nouser)", client.database or "(nodb)", "none", state,
            addr, port, laddr, lport, _ts(client.connect_time), _ts(client.request_time),
            *_split_us(wait), 0, _ptr(client), _ptr(client.server), 0, "",
            client.params.get("application_name", ""), len(client.prepared), client.id,
        )
        if debug:
            row += (0, 0, 0, 0, 0, client.framer.pending(), 0)
        sockstate = {"active": "cl_active", "idle": "cl_active", "waiting": "cl_waiting",
                     "login": "cl_login"}[state]
        out.append((sockstate, row))
    return out


def _server_rows(proxy: ProxyServer, debug: bool = False) -> list[tuple[str, tuple]]:
    out = []
    for (dbname, _user), pool in sorted(proxy.pools.items()):
        groups = (
            ("active", sorted(pool.active, key=lambda s: s.id)),
            ("idle", [s for s in pool.idle if not s.needs_check]),
            ("used", [s for s in pool.idle if s.needs_check]),
            ("tested", sorted(pool.cleaning, key=lambda s: s.id)),
        )
        for state, servers in groups:
            for server in servers:
                addr, port = server.addr
                laddr, lport = server.local_addr
                last = max(server.last_used, server.link_time or 0.0)
                row: tuple = (
                    "S", pool.user, dbname, "none", state, addr, port, laddr, lport,
                    _ts(server.connect_time), _ts(_epoch(last)), 0, 0,
                    int(bool(server.close_needed)), _ptr(server), _ptr(server.client),
                    server.pid, "", server.params.get("application_name", ""),
                    len(server.prepared), server.id,
                )
                if debug:
                    row += (0, 0, 0, 0, 0, server.framer.pending(), 0)
                out.append(("sv_" + state, row))
    return out


def show_clients(proxy: ProxyServer) -> list[tuple]:
    return [row for state, row in _client_rows(proxy) if state != "cl_login"]


def show_servers(proxy: ProxyServer) -> list[tuple]:
    return [row for _, row in _server_rows(proxy)]


def show_sockets(proxy: ProxyServer, only_active: bool = False) -> list[tuple]:
    rows = []
    for state, row in _client_rows(proxy, True) + _server_rows(proxy, True):
        row = row[:4] + (state,) + row[5:]
        if not only_active or row[-2]:  # pkt_avail: bytes buffered, not yet processed
            rows.append(row)
    return rows


def _disabled(proxy: ProxyServer) -> set[str]:
    return proxy.disabled_dbs


def show_databases(proxy: ProxyServer) -> list[tuple]:
    cfg = proxy.cfg
    p = cfg.proxy
    clients: dict[str, int] = {}
    for client in proxy.clients:
        if client.ready:
            clients[client.database] = clients.get(client.database, 0) + 1
    disabled = _disabled(proxy)
    rows = []
    for name, db in cfg.databases.items():
        rows.append((
            name, db.host, db.port, db.dbname or name, db.user or None,
            p.default_pool_size if db.pool_size is None else db.pool_size,
            p.min_pool_size if db.min_pool_size is None else db.min_pool_size,
            p.reserve_pool_size if db.reserve_pool_size is None else db.reserve_pool_size,
            int(p.server_lifetime), db.pool_mode, None,
            db.max_db_connections or p.max_db_connections, proxy.db_connection_count(name),
            0, clients.get(name, 0), int(name in proxy.paused_dbs), int(name in disabled),
        ))
    for name in RESERVED_DATABASES:  # the virtual admin databases, as PgBouncer lists its own
        rows.append((
            name, None, p.listen_port, name, None, 2, 0, 0, 0, "statement", None, 0, 0, 0,
            clients.get(name, 0), 0, 0,
        ))
    rows.sort(key=lambda r: r[0])
    return rows


def show_users(proxy: ProxyServer) -> list[tuple]:
    names = set(proxy.userlist)
    servers: dict[str, int] = {}
    for (_, user), pool in proxy.pools.items():
        names.add(user)
        servers[user] = servers.get(user, 0) + pool.total()
    clients: dict[str, int] = {}
    for client in proxy.clients:
        if client.user:
            names.add(client.user)
            clients[client.user] = clients.get(client.user, 0) + 1
    return [
        (name, "", "", None, 0, servers.get(name, 0), 0, clients.get(name, 0))
        for name in sorted(names)
    ]


def show_lists(proxy: ProxyServer) -> list[tuple]:
    servers = sum(p.total() - p.connecting for p in proxy.pools.values())
    login = sum(1 for c in proxy.clients if not c.ready)
    users = {u for _, u in proxy.pools} | set(proxy.userlist)
    return [
        ("databases", len(proxy.cfg.databases) + len(RESERVED_DATABASES)),
        ("users", len(users)),
        ("peers", 0),
        ("pools", len(proxy.pools)),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", len(proxy.clients)),
        ("login_clients", login),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]


def show_state(proxy: ProxyServer) -> list[tuple]:
    if proxy.suspended:
        mode = "suspended"
    elif proxy.paused_all:
        mode = "paused"
    else:
        mode = "active"
    return [(k, "yes" if k == mode else "no") for k in ("active", "paused", "suspended")]


def _iso(value: datetime | float | None) -> str | None:
    """A timestamp as ISO 8601 text (UTC for unix times); None (NULL) for never/unknown."""
    if value is None or value == 0:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return datetime.fromtimestamp(value, UTC).isoformat()


def show_tviews(proxy: ProxyServer) -> list[tuple]:
    """One row per TVIEW of every database's runtime catalog.  ``rows`` is NULL: the row count
    of a tv_ table is not known without a query, and the console does no I/O."""
    engine = proxy.tviews
    if engine is None:
        return []
    rows = []
    for dbname, cat in sorted(engine.catalogs.items()):
        for entity, entry in sorted(cat.entries.items(), key=lambda kv: kv[1].table_name):
            rows.append((
                dbname, entry.table_name, entity, entry.pk_column, ",".join(entry.sources),
                ",".join(entry.depends_on), entry.strategy, None, _iso(entry.created_at),
            ))
    return rows


def _tview_stat_row(dbname: str, tview: str, st: Any) -> tuple:
    avg = st.total_refresh_us // st.refresh_statements if st.refresh_statements else 0
    return (
        dbname, tview, st.commits, st.keys_enqueued, st.keys_coalesced, st.rows_refreshed,
        st.rows_deleted, st.cascade_rows, st.full_refreshes, st.refresh_statements, st.errors,
        st.total_refresh_us, avg, st.max_refresh_us, _iso(st.last_refresh_at),
    )


def show_tview_stats(proxy: ProxyServer) -> list[tuple]:
    """Per (database, entity) counters, then the database's totals as tview='*'.  Every TVIEW
    of the catalog has a row (zeros until it is first refreshed), and so has a dropped one
    that still has counters."""
    engine = proxy.tviews
    if engine is None:
        return []
    from tvproxy.tview.engine import EntityStats

    stats = dict(engine.stats)
    dbs = {db for db, _ in stats} | {db for db, cat in engine.catalogs.items() if cat.entries}
    rows = []
    for dbname in sorted(dbs):
        cat = engine.catalogs.get(dbname)
        entries = cat.entries if cat is not None else {}
        entities = set(entries) | {e for d, e in stats if d == dbname and e != "*"}
        named = []
        for entity in entities:
            entry = entries.get(entity)
            named.append((entry.table_name if entry is not None else f"tv_{entity}", entity))
        for tview, entity in sorted(named):
            rows.append(_tview_stat_row(dbname, tview, stats.get((dbname, entity), EntityStats())))
        rows.append(_tview_stat_row(dbname, "*", stats.get((dbname, "*"), EntityStats())))
    return rows


def show_tview_queue(proxy: ProxyServer) -> list[tuple]:
    """One row per client transaction and entity with pending keys; age in microseconds since
    the transaction recorded its first key."""
    engine = proxy.tviews
    if engine is None:
        return []
    now = time.monotonic()
    rows = []
    for client in sorted(proxy.clients, key=lambda c: c.id):
        tv = getattr(client, "tview", None)
        tracker = getattr(tv, "tracker", None)
        if tracker is None:
            continue
        pending = tracker.pending()
        started = getattr(tv, "started", 0.0) or 0.0
        age = max(int((now - started) * 1e6), 0) if started else 0
        for entity, keys in sorted(pending.items()):
            if keys:
                rows.append((client.id, client.database, entity, len(keys), tracker.depth, age))
    return rows


def _show_tview_pending(proxy: ProxyServer, columns: Columns | None) -> Result:
    """SHOW TVIEW PENDING (admin/pending.py): the query runs as a task; the console waits for
    it (``Result.wait``) and the rows are filled in when it is done."""
    res = Result("SHOW", columns)
    task = asyncio.get_running_loop().create_task(pending.collect(proxy))
    taken = False

    def ready() -> bool:
        nonlocal taken
        if not task.done():
            return False
        if not taken:
            taken = True
            if task.cancelled() or task.exception() is not None:
                reason = "cancelled" if task.cancelled() else str(task.exception())
                log.error("show tview pending failed", error=reason)
                res.notices.append(B.notice_response(
                    f"SHOW TVIEW PENDING failed: {reason}", "XX000", "WARNING"))
            else:
                queues, res.notices = task.result()
                res.rows = [(p.gid, p.database, p.keys, _iso(p.prepared_at), p.state)
                            for p in queues]
        return True

    res.wait = ready
    return res


def show(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    subject = cmd.arg
    columns = describe(cmd)
    if subject == "help":
        return Result("SHOW", notices=[_notice("Console usage", HELP_TEXT)])
    if subject in FAKE_PARAMS:
        welcome = {k.lower(): v for k, v in proxy.admin_welcome().items()}
        return Result("SHOW", columns, [(welcome.get(subject, FAKE_PARAMS[subject]),)])
    producers: dict[str, Callable[[], list[tuple]]] = {
        "pools": lambda: show_pools(proxy),
        "stats": lambda: show_stats(proxy),
        "stats_totals": lambda: show_stats_totals(proxy),
        "stats_averages": lambda: show_stats_averages(proxy),
        "totals": lambda: show_totals(proxy),
        "clients": lambda: show_clients(proxy),
        "servers": lambda: show_servers(proxy),
        "sockets": lambda: show_sockets(proxy),
        "active_sockets": lambda: show_sockets(proxy, only_active=True),
        "databases": lambda: show_databases(proxy),
        "users": lambda: show_users(proxy),
        "config": lambda: [tuple(r) for r in config_rows(proxy.cfg)],
        "lists": lambda: show_lists(proxy),
        "version": lambda: [(VERSION_STRING,)],
        "state": lambda: show_state(proxy),
        "tviews": lambda: show_tviews(proxy),
        "tview stats": lambda: show_tview_stats(proxy),
        "tview queue": lambda: show_tview_queue(proxy),
    }
    if subject == "tview pending":  # asks the databases: answered once they replied
        return _show_tview_pending(proxy, columns)
    if subject == "fds":  # it would hand out cancel keys: admin only, as PgBouncer
        session.require_admin()
        return Result("SHOW", columns, [])
    producer = producers.get(subject)
    if producer is not None:
        return Result("SHOW", columns, producer())
    # mem, dns_*, peers, peer_pools: nothing to report
    return Result("SHOW", columns, [])


# --- control commands --------------------------------------------------------------------------

def _database(proxy: ProxyServer, name: str, what: str) -> str:
    if _admin_db(name):
        raise AdminError("55000", f"cannot {what} admin db: {name}")
    if name in proxy.cfg.databases:
        return name
    if name.lower() in proxy.cfg.databases:
        return name.lower()
    raise AdminError("3D000", f"no such database: {name}")


def _drained(proxy: ProxyServer, db: str | None) -> bool:
    return all(not p.active and not p.cleaning for p in _pools_by_db(proxy, db))


def cmd_pause(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    if proxy.paused_all or proxy.suspended:
        raise AdminError("55000", "already suspended/paused")
    db = _database(proxy, cmd.arg, "pause") if cmd.arg else None
    proxy.pause(db)

    def done() -> bool:
        still = proxy.is_paused(db) if db is not None else proxy.paused_all
        return not still or _drained(proxy, db)

    return Result("PAUSE", wait=done)


def cmd_resume(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    if not cmd.arg:
        if proxy.shutdown_mode is not None:
            raise AdminError("55000", "pooler is shutting down")
        if not (proxy.paused_all or proxy.suspended or proxy.paused_dbs):
            raise AdminError("55000", "pooler is not paused/suspended")
        proxy.resume(None)
    else:
        db = _database(proxy, cmd.arg, "resume")
        if db not in proxy.paused_dbs:
            raise AdminError("55000", f"database {db} is not paused")
        proxy.resume(db)
    return Result("RESUME")


def cmd_suspend(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    if proxy.paused_all or proxy.suspended:
        raise AdminError("55000", "already suspended/paused")
    if proxy.paused_dbs:
        raise AdminError("55000", "cannot suspend with paused databases")
    proxy.pause(None)
    proxy.suspended = True
    return Result("SUSPEND")


def cmd_reconnect(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    db = _database(proxy, cmd.arg, "reconnect") if cmd.arg else None
    proxy.reconnect(db)
    return Result("RECONNECT")


def cmd_wait_close(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    db = _database(proxy, cmd.arg, "wait in") if cmd.arg else None

    def done() -> bool:
        for pool in _pools_by_db(proxy, db):
            if any(s.close_needed for s in pool.active) or any(
                s.close_needed for s in pool.cleaning
            ):
                return False
        return True

    return Result("WAIT_CLOSE", wait=done)


def cmd_kill(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    if proxy.paused_all or proxy.suspended:
        raise AdminError("55000", "already suspended/paused")
    db = _database(proxy, cmd.arg, "kill") if cmd.arg else None
    proxy.kill(db)
    return Result("KILL")


def cmd_kill_client(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    try:
        target = int(cmd.arg)
    except ValueError:
        raise AdminError("22023", "invalid client pointer supplied") from None
    for client in list(proxy.clients):
        if client.id == target:
            client.fatal("08P01", "admin forced disconnect")
            return Result("KILL_CLIENT")
    raise AdminError("42704", "client not found")


def _toggle(session: AdminSession, cmd: Command, disable: bool) -> Result:
    proxy = session.proxy
    word = "disable" if disable else "enable"
    if not cmd.arg:
        raise AdminError("42601", "a database is required")
    db = _database(proxy, cmd.arg, word)
    disabled = proxy.disabled_dbs
    if disable:
        disabled.add(db)
    else:
        disabled.discard(db)
    return Result(word.upper())


def cmd_reload(session: AdminSession, cmd: Command) -> Result:
    try:
        session.proxy.reload()
    except ConfigError as exc:
        log.warning("RELOAD failed, keeping the running config", error=str(exc))
        raise AdminError("F0000", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the old config stays
        log.warning("RELOAD failed, keeping the running config", error=str(exc))
        raise AdminError("F0000", f"RELOAD failed: {exc}") from None
    return Result("RELOAD")


def _runtime_keys(session: AdminSession) -> set[str]:
    cfg = session.proxy.cfg
    return {f.name for obj in (cfg.proxy, cfg.auth, cfg.admin) for f in dataclasses.fields(obj)}


def cmd_set(session: AdminSession, cmd: Command) -> Result:
    key = cmd.arg.lower()
    if key in FAKE_PARAMS:  # drivers' session settings: accepted and ignored, as PgBouncer
        return Result("SET", notices=[_notice("SET ignored")])
    session.require_admin()
    proxy = session.proxy
    if key not in _runtime_keys(session):
        if key in PGBOUNCER_GLOBAL_SETTINGS:
            raise AdminError("0A000", f"SET: {key}: PgBouncer setting not implemented by tvproxy")
        raise AdminError("42704", f"SET: {key}: unknown configuration key")
    if key in NOT_CHANGEABLE:
        raise AdminError(
            "55P02", f"SET: {key}: cannot be changed at runtime; edit the config and restart"
        )
    section = next(
        obj for obj in (proxy.cfg.proxy, proxy.cfg.auth, proxy.cfg.admin) if hasattr(obj, key)
    )
    old = getattr(section, key)
    try:
        set_runtime_value(proxy.cfg, key, cmd.value)
        if key == "auth_file":
            proxy.reload_userlist()
    except ConfigError as exc:
        setattr(section, key, old)
        raise AdminError("22023", str(exc)) from None
    log.info("admin SET", user=session.client.user, key=key, value=_fmt_value(getattr(section, key)))
    return Result("SET")


def _fmt_value(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def cmd_shutdown(session: AdminSession, cmd: Command) -> Result:
    proxy = session.proxy
    mode = cmd.arg or None
    # Immediate SHUTDOWN sends no answer (as PgBouncer): the connection ends with the process.
    return Result("SHUTDOWN", silent=mode is None, after=lambda: proxy.shutdown(mode))


CONTROL: dict[str, Callable[[AdminSession, Command], Result]] = {
    "pause": cmd_pause,
    "resume": cmd_resume,
    "suspend": cmd_suspend,
    "reconnect": cmd_reconnect,
    "wait_close": cmd_wait_close,
    "kill": cmd_kill,
    "kill_client": cmd_kill_client,
    "disable": lambda s, c: _toggle(s, c, True),
    "enable": lambda s, c: _toggle(s, c, False),
    "reload": cmd_reload,
    "shutdown": cmd_shutdown,
}


def execute(session: AdminSession, cmd: Command) -> Result:
    """Run one command; AdminError for anything the client should see as an ERROR."""
    if cmd.verb == "show":
        return show(session, cmd)
    if cmd.verb == "set":
        return cmd_set(session, cmd)
    session.require_admin()
    log.info("admin command", user=session.client.user, command=cmd.verb.upper(), arg=cmd.arg)
    return CONTROL[cmd.verb](session, cmd)
