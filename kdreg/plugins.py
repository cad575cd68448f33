"""The plugin manager: kdreg's hook specs plus every plugin of the entry-point group ``kdreg``.

Built-in plugins (distribution ``kdreg``) are found the same way as third-party ones. Set
``KDREG_DISABLE_PLUGINS`` to a comma-separated list of entry-point names or distribution names to
skip them, for example to get past a broken third-party plugin.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

import pluggy

from kdreg import hookspecs
from kdreg.errors import PluginError

GROUP = "kdreg"
DISABLE_ENV = "KDREG_DISABLE_PLUGINS"

_manager: pluggy.PluginManager | None = None


def disabled_plugins() -> set[str]:
    """Entry-point or distribution names listed in ``KDREG_DISABLE_PLUGINS``."""
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"], dist.version


def make_plugin_manager(extra: list[Any] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with every enabled entry-point plugin (and ``extra`` objects)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.kdreg_dists = {}  # type: ignore[attr-defined]
    skip = disabled_plugins()
    problems = []
    eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: (_distribution(e)[0] != "kdreg", e.name))
    seen: set[str] = set()
    for ep in eps:
        dist, version = _distribution(ep)
        if ep.name in skip or dist in skip or ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's fault
            problems.append(
                f"plugin {ep.name!r} from distribution {dist} {version} failed to import: "
                f"{type(exc).__name__}: {exc} (skip it with {DISABLE_ENV}={ep.name})"
            )
            continue
        try:
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - pluggy validates hook implementations here
            problems.append(
                f"plugin {ep.name!r} from distribution {dist} {version} has a bad hook "
                f"implementation: {exc} (skip it with {DISABLE_ENV}={ep.name})"
            )
            continue
        pm.kdreg_dists[ep.name] = (dist, version)  # type: ignore[attr-defined]
    for obj in extra or []:
        name = getattr(obj, "__name__", None) or repr(obj)
        try:
            pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"plugin {name!r} has a bad hook implementation: {exc}")
            continue
        pm.kdreg_dists[name] = ("local", "")  # type: ignore[attr-defined]
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
    """Forget the cached manager and registries (or install ``pm``); for tests and tools."""
    global _manager
    _manager = pm
    from kdreg import registry

    registry.reset()


def distribution_of(pm: pluggy.PluginManager, plugin_name: str) -> tuple[str, str]:
    return pm.kdreg_dists.get(plugin_name, ("unknown", ""))  # type: ignore[attr-defined]


def plugin_versions(pm: pluggy.PluginManager | None = None) -> dict[str, str]:
    """``{distribution: version}`` of every loaded plugin, for results.json."""
    pm = pm or plugin_manager()
    return {dist: version for dist, version in pm.kdreg_dists.values()}  # type: ignore[attr-defined]
