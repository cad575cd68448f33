"""The plugin manager: kdreg's hook specs plus every plugin of the entry-point group ``kdreg``.

Built-in plugins (distribution ``kdreg``) are found the same way as third-party ones. A plugin is
registered under its entry-point name; a third-party entry point whose name another plugin
already took (a built-in ``graphs``, say) is registered as ``"<distribution>:<entry point>"``.
Set ``KDREG_DISABLE_PLUGINS`` to a comma-separated list of entry-point names, distribution names
or such registered names to skip them, for example to get past a broken third-party plugin.

kdreg's own data about the plugins of a manager (their distributions and versions) lives in a
:class:`PluginSet` per manager, kept here (:func:`plugin_set`), not on pluggy's object.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import weakref
from importlib import metadata
from typing import Any

import attrs
import pluggy

from kdreg import hookspecs
from kdreg.errors import PluginError

GROUP = "kdreg"
DISABLE_ENV = "KDREG_DISABLE_PLUGINS"
LOCAL = "local"  # the distribution of plugins passed as objects (``extra``)

_manager: pluggy.PluginManager | None = None


@attrs.frozen
class PluginInfo:
    """Where one registered plugin comes from."""

    #: the name it is registered under in the plugin manager (unique)
    name: str
    distribution: str
    version: str
    #: its entry point's name (``name`` unless that clashed with another plugin's), or ``""``
    entry_point: str = ""


@attrs.define
class PluginSet:
    """kdreg's record of the plugins of one plugin manager, by registered name."""

    plugins: dict[str, PluginInfo] = attrs.field(factory=dict)

    def add(self, info: PluginInfo) -> None:
        self.plugins[info.name] = info

    def distribution_of(self, name: str) -> tuple[str, str]:
        info = self.plugins.get(name)
        return (info.distribution, info.version) if info else ("unknown", "")

    def versions(self) -> dict[str, str]:
        """``{distribution: version}`` of every plugin."""
        return {info.distribution: info.version for info in self.plugins.values()}


_sets: weakref.WeakKeyDictionary[pluggy.PluginManager, PluginSet] = weakref.WeakKeyDictionary()


def plugin_set(pm: pluggy.PluginManager) -> PluginSet:
    """kdreg's record of ``pm``'s plugins (empty for a manager kdreg did not make)."""
    if pm not in _sets:
        _sets[pm] = PluginSet()
    return _sets[pm]


def disabled_plugins() -> set[str]:
    """The names listed in ``KDREG_DISABLE_PLUGINS``: entry-point names, distribution names or
    registered names (``"<distribution>:<entry point>"``)."""
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def _normalized(name: str) -> str:
    """A distribution name as packaging compares them (``My_Plugin`` is ``my-plugin``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"], dist.version


def _is_disabled(skip: set[str], ep_name: str, dist: str, registered: str) -> bool:
    dists = {_normalized(s) for s in skip}
    return ep_name in skip or registered in skip or _normalized(dist) in dists


def _hook_problems(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """What is wrong with the hooks of ``plugin``, just registered in ``pm`` (whose other plugins
    passed this check): implementations that match no spec (a misspelled hook name), and
    ``kdreg_*`` functions it forgot to decorate with ``@kdreg.hookimpl``."""
    specs = sorted(n for n in dir(hookspecs) if n.startswith("kdreg_"))
    problems = []
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        for caller in pm.get_hookcallers(plugin) or []:
            mine = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
            if not caller.has_spec() and not all(impl.optionalhook for impl in mine):
                close = difflib.get_close_matches(caller.name, specs, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"implements {caller.name}, which is no kdreg hook{hint}; "
                                f"the hooks are {', '.join(specs)}")
    for attr in dir(plugin):
        if not attr.startswith("kdreg_"):
            continue
        obj = getattr(plugin, attr, None)
        if inspect.isroutine(obj) and pm.parse_hookimpl_opts(plugin, attr) is None and (
                attr in specs or difflib.get_close_matches(attr, specs, n=1)):
            problems.append(f"defines {attr} without the @kdreg.hookimpl decorator, so kdreg "
                            "would never call it")
    return problems


def _register(pm: pluggy.PluginManager, plugin: object, name: str, where: str,
              skip_hint: str) -> list[str]:
    """Register ``plugin`` as ``name``; the problems, each naming the plugin (``where``)."""
    other = pm.get_name(plugin)
    if other is not None:
        return [f"{where} is the object already registered as plugin {other!r}{skip_hint}"]
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # noqa: BLE001 - pluggy validates hook implementations here
        return [f"{where} has a bad hook implementation: {exc}{skip_hint}"]
    problems = [f"{where} {p}{skip_hint}" for p in _hook_problems(pm, plugin)]
    if problems:
        pm.unregister(plugin)
    return problems


def make_plugin_manager(extra: list[Any] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with every enabled entry-point plugin (and ``extra`` objects)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = plugin_set(pm)
    skip = disabled_plugins()
    problems = []
    eps = sorted(metadata.entry_points(group=GROUP),
                 key=lambda e: (_distribution(e)[0] != "kdreg", _distribution(e)[0], e.name))
    seen: set[tuple[str, str, str]] = set()
    for ep in eps:
        dist, version = _distribution(ep)
        if (dist, ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((dist, ep.name, ep.value))
        name = ep.name if pm.get_plugin(ep.name) is None else f"{dist}:{ep.name}"
        if _is_disabled(skip, ep.name, dist, name):
            continue
        where = f"plugin {name!r} from distribution {dist} {version}"
        hint = f" (skip it with {DISABLE_ENV}={name})"
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's fault
            problems.append(f"{where} failed to import: {type(exc).__name__}: {exc}{hint}")
            continue
        found = _register(pm, plugin, name, where, hint)
        if found:
            problems += found
            continue
        plugins.add(PluginInfo(name, dist, version, ep.name))
    for obj in extra or []:
        name = getattr(obj, "__name__", None) or repr(obj)
        if pm.get_plugin(name) is not None:
            name = f"{LOCAL}:{name}"
        found = _register(pm, obj, name, f"plugin {name!r}", "")
        if found:
            problems += found
            continue
        plugins.add(PluginInfo(name, LOCAL, ""))
    if problems:
        raise PluginError(problems)
    return pm


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    if _manager is None:
        _manager = make_plugin_manager()
    return _manager


def reset(pm: pluggy.PluginManager | None = None) -> None:
    """Forget the cached manager (or install ``pm``); for tests and tools. The registries
    (:mod:`kdreg.registry`) follow: each is collected again from the next manager."""
    global _manager
    _manager = pm


def distribution_of(pm: pluggy.PluginManager, plugin_name: str) -> tuple[str, str]:
    """``(distribution, version)`` of the plugin registered as ``plugin_name`` in ``pm``."""
    return plugin_set(pm).distribution_of(plugin_name)


def plugin_versions(pm: pluggy.PluginManager | None = None) -> dict[str, str]:
    """``{distribution: version}`` of every loaded plugin, for results.json."""
    return plugin_set(pm or plugin_manager()).versions()
