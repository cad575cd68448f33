"""Name -> factory tables, filled through the ``kdreg_register_*`` hooks.

One :class:`Registry` per kind (backbones, graphs, bridges, datasets, divergences). Lookups of an
unknown name raise an error that lists the registered names; a name registered twice is an error
naming both plugins.

The registries are read from the process-wide plugin manager (:func:`kdreg.plugins.plugin_manager`)
and kept until it changes: this module imports :mod:`kdreg.plugins`, never the other way round.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from kdreg import plugins
from kdreg.errors import PluginError, UserError
from kdreg.hookspecs import Register

KINDS = {
    "backbone": "kdreg_register_backbones",
    "graph": "kdreg_register_graphs",
    "bridge": "kdreg_register_bridges",
    "dataset": "kdreg_register_datasets",
    "divergence": "kdreg_register_divergences",
    "feature_loss": "kdreg_register_feature_losses",
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


#: kind -> (the plugin manager it was collected from, the registry)
_registries: dict[str, tuple[pluggy.PluginManager, Registry]] = {}


def reset() -> None:
    """Forget the collected registries (they are collected again on next use)."""
    _registries.clear()


def collect(kind: str, pm: pluggy.PluginManager | None = None) -> Registry:
    """Call the ``kdreg_register_*`` hook of ``kind`` on every plugin and build its registry."""
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
    """The registry of ``kind`` (backbone, graph, bridge, dataset or divergence), collected once
    per plugin manager: :func:`kdreg.plugins.reset` makes the next call collect it again."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")
    pm = plugins.plugin_manager()
    cached = _registries.get(kind)
    if cached is None or cached[0] is not pm:
        cached = _registries[kind] = (pm, collect(kind, pm))
    return cached[1]


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


def list_divergences() -> list[str]:
    return get_registry("divergence").names()


def list_feature_losses() -> list[str]:
    return get_registry("feature_loss").names()
