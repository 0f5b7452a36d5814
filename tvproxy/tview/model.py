"""The runtime view of one database's TVIEWs: what the engine consults on every statement (pure).

Built from catalog entries (``catalog.CatalogEntry``) and the primary keys of the base tables:
which tables are tracked, how a write to each maps to TVIEW keys, the refresh order, and the
SQL fragments the planner needs for unknown keys (``all_keys``) and aggregated children
(``derived``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.analyze import refresh_order
from tvproxy.tview.capture import TrackedTable
from tvproxy.tview.catalog import CatalogEntry
from tvproxy.tview.opaque import OpaqueFacts, function_pattern
from tvproxy.tview.planner import TviewSpec
from tvproxy.tview.treekeys import SelfRule


@dataclass(frozen=True)
class BaseTable:
    name: str
    schema: str
    pk: str
    pk_type: str
    columns: tuple[str, ...]


@dataclass
class RuntimeCatalog:
    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    specs: dict[str, TviewSpec] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    tracked: tuple[TrackedTable, ...] = ()
    table_names: frozenset[str] = frozenset()
    tv_tables: dict[str, str] = field(default_factory=dict)  # tv_ table name -> entity
    key_types: dict[str, str] = field(default_factory=dict)
    all_keys: dict[str, str] = field(default_factory=dict)
    derived: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # base entity -> TVIEW entities aggregating it (their keys need the child's old fk values)
    aggregated_into: dict[str, list[str]] = field(default_factory=dict)
    full_on: dict[str, list[str]] = field(default_factory=dict)  # base entity -> full TVIEWs
    # child entity -> (parent entity, SELECT of the parent keys of children $1) before a write
    preimage: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # (TVIEW entity, fk column) -> SELECT of the fk from its own base table for keys {keys}
    fk_sources: dict[tuple[str, str], str] = field(default_factory=dict)
    # opaque writers (tview/opaque.py): tracked tables by quoted qualified name -> entity
    audited: dict[str, str] = field(default_factory=dict)
    audit_name: dict[str, str] = field(default_factory=dict)  # table -> its audited name
    functions: re.Pattern[str] | None = None
    trigger_tables: frozenset[str] = frozenset()
    track_counts: bool = True  # off: the audit cannot see opaque writes
    # child entity -> (parent entity, the child's fk column the parent aggregates by)
    aggregations: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    server_version: int = 0  # major version of the database's server (0: not known)
    plans: dict[object, object] = field(default_factory=dict)  # refresh plan templates by shape

    @property
    def empty(self) -> bool:
        return not self.entries


def build_runtime(entries: Sequence[CatalogEntry], tables: Mapping[str, BaseTable],
                  schema: str = "public", opaque: OpaqueFacts | None = None) -> RuntimeCatalog:
    cat = RuntimeCatalog()
    if opaque is not None:
        cat.functions = function_pattern(opaque.functions)
        cat.trigger_tables = opaque.trigger_tables
        cat.track_counts = opaque.track_counts
    cat.entries = {e.entity: e for e in entries}
    depends = {e.entity: {d for d in e.depends_on if d in cat.entries} for e in entries}
    cat.order = refresh_order(depends)
    tracked: dict[str, TrackedTable] = {}

    def track(table: str) -> str | None:
        base = tables.get(table)
        if base is None:
            return None
        entity = table[3:] if table.startswith("tb_") else table
        if table not in tracked:
            keycols = frozenset(c for c in base.columns if c.startswith(("pk_", "fk_")))
            position = base.columns.index(base.pk) if base.pk in base.columns else None
            tracked[table] = TrackedTable(table, entity, base.pk, keycols | {base.pk},
                                          base.schema, position)
            cat.key_types[entity] = base.pk_type
            cat.all_keys.setdefault(entity, f"SELECT {q(base.pk)} FROM "
                                            f"{q(base.schema)}.{q(table)}")
            cat.audited[f"{q(base.schema)}.{q(table)}"] = entity
            cat.audit_name[table] = f"{q(base.schema)}.{q(table)}"
        return entity

    for entry in entries:
        mapping = entry.key_mapping
        columns = tuple(mapping.get("columns", ()))
        embeds: list[tuple[str, str]] = []
        for rule in mapping.get("rules", ()):
            entity = track(rule["table"])
            if entity is None:
                continue
            kind = rule["rule"]
            if kind == "embedding" and (rule["column"], entity) not in embeds:
                embeds.append((rule["column"], entity))
            elif kind == "aggregation":
                child = tables[rule["table"]]
                cat.derived.setdefault(entry.entity, []).append(
                    (entity, f"SELECT {q(rule['column'])} FROM {q(child.schema)}.{q(child.name)}"
                             f" WHERE {q(child.pk)} IN ({{keys}})"))
                cat.aggregated_into.setdefault(entity, []).append(entry.entity)
                pair = (entry.entity, rule["column"])
                if pair not in cat.aggregations.get(entity, ()):
                    cat.aggregations[entity] = (*cat.aggregations.get(entity, ()), pair)
                cat.preimage.setdefault(entity, []).append(
                    (entry.entity, f"SELECT {q(rule['column'])}::text FROM "
                                   f"{q(child.schema)}.{q(child.name)} WHERE {q(child.pk)} ="
                                   f" ANY($1::{child.pk_type}[])"))
            elif kind == "transitive" and rule.get("via") in cat.entries:
                fk = f"fk_{rule['via']}"
                if (fk, rule["via"]) not in embeds:
                    embeds.append((fk, rule["via"]))
        for table in mapping.get("unmapped", ()):
            entity = track(table)
            if entity is not None:
                cat.full_on.setdefault(entity, []).append(entry.entity)
        if entry.strategy == "full":
            cat.full_on.setdefault(entry.entity, []).append(entry.entity)
        for dep in entry.depends_on:
            fk = f"fk_{dep}"
            if dep in cat.entries and fk in columns and (fk, dep) not in embeds:
                embeds.append((fk, dep))
        own = next((tables[r["table"]] for r in mapping.get("rules", ())
                    if r["rule"] == "self" and r["table"] in tables), None)
        for fk, _parent in embeds:
            if own is not None and fk in own.columns and own.pk == entry.pk_column:
                cat.fk_sources[(entry.entity, fk)] = (
                    f"SELECT {q(fk)} FROM {q(own.schema)}.{q(own.name)} WHERE {q(own.pk)} IN "
                    f"({{keys}})")
        tree = _self_rule(cat, entry, own, mapping.get("tree"))
        spec = TviewSpec(entry.entity, entry.table_name, entry.view_name, entry.pk_column,
                         entry.pk_type, columns, tuple(embeds), mapping.get("schema", schema),
                         tree, mapping.get("touch"))
        cat.specs[entry.entity] = spec
        cat.key_types[entry.entity] = entry.pk_type
        tv = f"{q(spec.schema)}.{q(spec.table)}"
        view = f"{q(spec.schema)}.{q(spec.view)}"
        cat.all_keys[entry.entity] = (f"SELECT {q(spec.pk)} FROM {view} UNION "
                                      f"SELECT {q(spec.pk)} FROM {tv}")
        cat.tv_tables[entry.table_name] = entry.entity
    cat.tracked = tuple(tracked.values())
    cat.table_names = frozenset(tracked)
    return cat


def _self_rule(cat: RuntimeCatalog, entry: CatalogEntry, own: BaseTable | None,
               tree: Mapping[str, Any] | None) -> SelfRule | None:
    """The propagation between rows of a self-referencing TVIEW (tview/selfref.py).  Where it
    goes up to parents, the old parents of a row whose fk changes count as touched keys, got
    the way aggregated children give theirs (pre-image, or RETURNING old.* on PostgreSQL 18)."""
    if not tree or own is None:
        return None
    link = str(tree["link"])
    terms = tuple((int(t[0]), int(t[1])) for t in tree["terms"])
    e = entry.entity
    parents = None
    if link not in own.columns:  # the table changed since: nothing to follow the rows by
        cat.full_on.setdefault(e, []).append(e)
        return None
    if any(up for _, up in terms):
        parents = old_parents(e)  # keys of the pseudo-entity: the old parents of written rows
        cat.key_types[parents] = own.pk_type
        cat.aggregated_into.setdefault(e, []).append(parents)
        cat.aggregations[e] = (*cat.aggregations.get(e, ()), (parents, link))
        cat.preimage.setdefault(e, []).append(
            (parents, f"SELECT {q(link)}::text FROM {q(own.schema)}.{q(own.name)} WHERE "
                      f"{q(own.pk)} = ANY($1::{own.pk_type}[])"))
    return SelfRule(own.schema, own.name, own.pk, link, terms,
                    str(tree.get("guard", SelfRule.guard)), parents)


def old_parents(entity: str) -> str:
    """The pseudo-entity whose keys are the old parents of the rows of a self-referencing
    TVIEW's base table the transaction wrote (no TVIEW has that name: it has a space)."""
    return f"{entity} (old parents)"
