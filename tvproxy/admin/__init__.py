"""The admin console: virtual databases ``tvproxy`` and ``pgbouncer`` (PgBouncer-compatible)."""

from tvproxy.admin.commands import AdminError, Command, Result, parse_query
from tvproxy.admin.console import AdminSession

__all__ = ["AdminError", "AdminSession", "Command", "Result", "parse_query"]
