"""Keys of a write read from a Bind's parameters (pure, no I/O): a parameter decoded by the
key's type, the keys of a captured write, and which prepared writes a Bind records on its own
(:class:`FastBind`: one key of one entity, the common OLTP write bound again and again)."""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from struct import error as struct_error

from tvproxy.protocol import decode as D
from tvproxy.tview.capture import KeyRef, WriteCapture
from tvproxy.tview.model import RuntimeCatalog
from tvproxy.tview.statement import Kind, Statement


def decode_param(value: bytes | None, fmt: int, pk_type: str) -> Hashable | None:
    if value is None:
        return None
    if fmt == 0:
        text = value.decode()
        return int(text) if pk_type in ("bigint", "integer", "smallint") else text
    if len(value) == 16 and pk_type == "uuid":
        return str(uuid.UUID(bytes=value))
    if pk_type in ("bigint", "integer", "smallint") and len(value) in (2, 4, 8):
        return int.from_bytes(value, "big", signed=True)
    if pk_type == "text" or pk_type.startswith("character"):
        return value.decode()
    return None


@dataclass(frozen=True, slots=True)
class FastBind:
    """How a Bind of a statement that writes one key of one entity, named by one parameter,
    records it: nothing else happens at such a Bind inside a transaction (the common write of
    an OLTP transaction, bound again and again)."""

    entity: str
    param: int  # 0-based
    pk_type: str

    def key(self, body: bytes, pos: int) -> Hashable | None:
        """The key in a Bind body (from ``pos``, just after the statement name); None when it
        cannot be read (a malformed Bind or value: the whole path says what it is)."""
        try:
            got = D.bind_param(body, pos, self.param)
            return None if got is None else decode_param(got[1], got[0], self.pk_type)
        except (struct_error, ValueError, UnicodeDecodeError):
            return None


def only_key(st: Statement, cat: RuntimeCatalog) -> KeyRef | None:
    """The one key a statement writes when recording it is all there is to do: one write of
    one entity, its key named (not an array), no rows returned, no pre-image of old parents,
    no full refresh, no pk it sets (:meth:`CaptureHooks._touch`'s common case, where
    :meth:`~ReturningHooks._returning_rewrite` appends nothing either).  None otherwise."""
    if st.kind != Kind.WRITE or len(st.writes) != 1:
        return None
    w = st.writes[0]
    keys = w.keys
    if (keys is None or len(keys) != 1 or keys[0].array or w.has_returning
            or w.op not in ("insert", "update", "delete") or w.assigns_pk
            or cat.full_on.get(w.entity)
            or cat.aggregated_into.get(w.entity) and (w.op == "delete" or w.assigns_key_columns)):
        return None
    return keys[0]


def fast_bind(st: Statement, cat: RuntimeCatalog) -> FastBind | None:
    """The :class:`FastBind` of a statement, or None when its Bind needs the whole path."""
    ref = only_key(st, cat)
    if ref is None or ref.param is None:
        return None
    entity = st.writes[0].entity
    return FastBind(entity, ref.param - 1, cat.key_types.get(entity, "text"))


def bound_keys(w: WriteCapture, body: bytes, pos: int, cat: RuntimeCatalog
               ) -> list[Hashable] | None:
    """The keys of a write from its literals and the parameters of its Bind (``body`` from
    ``pos``, just after the statement name; None: unknown).  A key or two is read from its own
    parameter; more, from all of them decoded once."""
    if w.keys is None:
        return None
    pk_type = cat.key_types.get(w.entity, "text")
    formats: list[int] = []
    values: list[bytes | None] | None = None
    try:
        if len(w.keys) > 2:  # an IN list: one pass over the parameters
            formats, values = D.bind_params(body, pos)
        keys: list[Hashable] = []
        for ref in w.keys:
            if ref.param is None:
                keys.append(ref.value)
                continue
            i = ref.param - 1
            if ref.array:
                return None
            if values is None:
                got = D.bind_param(body, pos, i)
                if got is None:
                    return None
                fmt, value = got
            else:
                if i >= len(values):
                    return None
                fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
                value = values[i]
            key = decode_param(value, fmt, pk_type)
            if key is None:
                return None
            keys.append(key)
    except (struct_error, ValueError, UnicodeDecodeError):
        return None  # a malformed Bind or value: the server rejects it itself
    return keys
