"""Logging: structlog, JSON lines in production, a readable console renderer in a terminal.

Log events are for state changes (a connection opened, a pool resized, a TVIEW batch refreshed),
never per query: the hot path counts in plain integers instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger", "LEVELS"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_level = logging.INFO  # the configured level (see debug_enabled)


def debug_enabled() -> bool:
    """Whether debug events are written: hot paths test this before building one."""
    return _level <= logging.DEBUG


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog (and the stdlib root logger) to write to stderr.

    ``json=None`` picks JSON lines when stderr is not a TTY and the console renderer when it is.
    Safe to call again (e.g. on reload); the last call wins.
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}"
        ) from None
    global _level
    _level = numeric
    if json is None:
        json = not _isatty(sys.stderr)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        processors = [
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            renderer,
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(sys.stderr))
        processors = [*shared, structlog.processors.StackInfoRenderer(), renderer]

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )

    # Libraries (asyncio, asyncpg) log through the stdlib: send them through the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if json else _identity,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_tvproxy", False):
            root.removeHandler(h)
    handler._tvproxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)


def get_logger(name: str, **initial: Any) -> Any:
    """A logger carrying ``logger=name`` (plus any initial key/values).

    Modules create theirs at import time, before ``configure_logging`` runs; every call is
    resolved against the configuration in force at that moment.
    """
    return _LazyLogger({"logger": name, **initial})


class _LazyLogger:
    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def bind(self, **values: Any) -> _LazyLogger:
        return _LazyLogger({**self._values, **values})

    def new(self, **values: Any) -> _LazyLogger:
        return _LazyLogger({"logger": self._values.get("logger"), **values})

    def unbind(self, *keys: str) -> _LazyLogger:
        return _LazyLogger({k: v for k, v in self._values.items() if k not in keys})

    def __getattr__(self, method: str) -> Any:
        return getattr(structlog.get_logger().bind(**self._values), method)


def _identity(_logger: Any, _name: str, event_dict: Any) -> Any:
    return event_dict


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
