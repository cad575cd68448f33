"""Name -> factory tables, filled through the ``kdreg_register_*`` hooks.

One :class:`Registry` per kind (backbones, graphs, bridges, datasets). Lookups of an unknown name
raise an error that lists the registered names; a name registered twice is an error naming both
plugins.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from kdreg.errors import PluginError, UserError
from kdreg.hookspecs import Register

KINDS = {
    "backbone": "kdreg_register_backbones",
    "graph": "kdreg_register_graphs",
    "bridge": "kdreg_register_bridges",
    "dataset": "kdreg_register_datasets",
}


@attrs.frozen
class Entry:
    """One registered factory."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str
    description: str = ""
    #: datasets: the declared ``(num_classes, channels, height, width)`` of their images, which
    #: ``kdreg validate`` uses when the data itself cannot be read
    shape: tuple[int, int, int, int] | None = None


class UnknownNameError(UserError, KeyError):
    """An unknown plugin name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return "\n".join(self.problems)


class Registry:
    """The registered factories of one kind."""

    def __init__(self, kind: str, entries: dict[str, Entry]):
        self.kind = kind
        self._entries = dict(sorted(entries.items()))

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self.names()) or 'none'}"


_registries: dict[str, Registry] = {}


def reset() -> None:
    _registries.clear()


def collect(kind: str, pm: pluggy.PluginManager | None = None) -> Registry:
    """Call the ``kdreg_register_*`` hook of ``kind`` on every plugin and build its registry."""
    from kdreg import plugins

    pm = pm or plugins.plugin_manager()
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    hook_name = KINDS[kind]
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        plugin_name = impl.plugin_name
        dist = plugins.distribution_of(pm, plugin_name)[0]
        register: Register = _Registrar(kind, plugin_name, dist, entries, problems)
        try:
            impl.function(register)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, not raised raw
            problems.append(
                f"plugin {plugin_name!r} ({dist}) failed in {hook_name}: {type(exc).__name__}: {exc}"
            )
    if problems:
        raise PluginError(problems)
    return Registry(kind, entries)


@attrs.define
class _Registrar:
    """The ``register`` callable (a :class:`kdreg.hookspecs.Register`) one plugin receives."""

    kind: str
    plugin: str
    dist: str
    entries: dict[str, Entry]
    problems: list[str]

    def __call__(self, name: str, factory: Callable[..., Any], description: str = "", *,
                 shape: tuple[int, int, int, int] | None = None) -> None:
        kind, plugin, dist = self.kind, self.plugin, self.dist
        if not isinstance(name, str) or not name:
            self.problems.append(f"plugin {plugin!r} ({dist}) registered a {kind} with a bad name {name!r}")
            return
        if not callable(factory):
            self.problems.append(f"plugin {plugin!r} ({dist}) registered {kind} {name!r} with a factory that is not callable")
            return
        if name in self.entries:
            other = self.entries[name]
            self.problems.append(
                f"{kind} {name!r} is registered twice: by plugin {other.plugin!r} "
                f"({other.distribution}) and by plugin {plugin!r} ({dist})"
            )
            return
        if shape is not None and (kind != "dataset" or len(shape) != 4
                                  or not all(isinstance(v, int) and v > 0 for v in shape)):
            self.problems.append(f"plugin {plugin!r} ({dist}) registered {kind} {name!r} with shape "
                                 f"{shape!r}; only datasets declare a shape: (classes, channels, "
                                 "height, width), positive integers")
            return
        self.entries[name] = Entry(name, factory, plugin, dist, description or _first_line(factory),
                                   shape)


def get_registry(kind: str) -> Registry:
    """The (cached) registry of ``kind``: backbone, graph, bridge or dataset."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")
    if kind not in _registries:
        _registries[kind] = collect(kind)
    return _registries[kind]


def _first_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def list_backbones() -> list[str]:
    return get_registry("backbone").names()


def list_graphs() -> list[str]:
    return get_registry("graph").names()


def list_bridges() -> list[str]:
    return get_registry("bridge").names()


def list_datasets() -> list[str]:
    return get_registry("dataset").names()
