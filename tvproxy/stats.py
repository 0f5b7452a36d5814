"""Plain integer counters per database, folded into averages every ``stats_period``."""

from __future__ import annotations

STAT_FIELDS = (
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
    "bind_count", "client_login_count",
)


class DbStats:
    __slots__ = (*STAT_FIELDS, "averages", "_last")

    def __init__(self) -> None:
        for name in STAT_FIELDS:
            setattr(self, name, 0)
        self.averages: dict[str, int] = dict.fromkeys(STAT_FIELDS, 0)
        self._last: dict[str, int] = dict.fromkeys(STAT_FIELDS, 0)

    def totals(self) -> dict[str, int]:
        totals = {name: getattr(self, name) for name in STAT_FIELDS}
        # time spent by queries is not timed per query on the hot path; the linked time is
        totals["query_time"] = max(totals["query_time"], totals["xact_time"])
        return totals

    def roll(self, period: float) -> None:
        """Per-second averages over the last period (times: per transaction/query, in us)."""
        now = self.totals()
        delta = {k: now[k] - self._last[k] for k in STAT_FIELDS}
        self._last = now
        per_sec = {k: int(delta[k] / period) if period > 0 else 0 for k in STAT_FIELDS}
        xacts = delta["xact_count"] or 0
        queries = delta["query_count"] or 0
        per_sec["xact_time"] = delta["xact_time"] // xacts if xacts else 0
        per_sec["query_time"] = delta["query_time"] // queries if queries else 0
        per_sec["wait_time"] = delta["wait_time"] // max(delta["server_assignment_count"], 1)
        self.averages = per_sec


class Stats:
    def __init__(self) -> None:
        self.dbs: dict[str, DbStats] = {}
        self.protocol_errors = 0
        self.servers_opened = 0

    def for_db(self, name: str) -> DbStats:
        stats = self.dbs.get(name)
        if stats is None:
            stats = self.dbs[name] = DbStats()
        return stats

    def roll(self, period: float) -> None:
        for stats in self.dbs.values():
            stats.roll(period)
