"""The plugin manager: built-in plugins and entry-point plugins, registered the same way.

>>> from fwdgrad_plugins import registered
>>> "gaussian" in registered("tangent_samplers")
True
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import pluggy

from fwdgrad_plugins import hookspecs

ENTRY_POINT_GROUP = "fwdgrad_plugins"
KINDS = ("tangent_samplers", "estimators", "integrations")
DEFAULT_PLUGINS = (
    "fwdgrad_plugins.tangents.samplers",
    "fwdgrad_plugins.tangents.orthogonal",
    "fwdgrad_plugins.estimators.weight",
    "fwdgrad_plugins.estimators.spsa",
    "fwdgrad_plugins.estimators.activity",
    "fwdgrad_plugins.estimators.per_example",
    "fwdgrad_plugins.estimators.local_losses",
    "fwdgrad_plugins.estimators.blockwise",
    "fwdgrad_plugins.estimators.guided",
    "fwdgrad_plugins.integrations",
)

@lru_cache(maxsize=None)
def plugin_manager() -> pluggy.PluginManager:
    """The one plugin manager: built-in plugins first, then the entry-point group.

    ``FWDGRAD_LOAD_PLUGINS=0`` loads the built-in plugins only (to isolate a bad plugin).
    """
    pm = pluggy.PluginManager("fwdgrad_plugins")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if os.environ.get("FWDGRAD_LOAD_PLUGINS", "1") != "0":
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


class UnknownNameError(ValueError):
    """A name that no registered plugin provides."""


class DuplicateNameError(ValueError):
    """A name that two plugins (or one plugin twice) register for the same kind."""


def _collect(kind: str) -> dict:
    """``{name: value}`` over every plugin's ``register_<kind>`` hook; a name registered twice
    raises :class:`DuplicateNameError` naming both plugins, so a third-party plugin never
    silently replaces a built-in one (or loses to it).

    Each hook implementation gets a ``register`` callback of its own (pluggy's
    ``get_hookimpls``), so the error can say who registered what."""
    if kind not in KINDS:
        raise UnknownNameError(f"unknown plugin kind {kind!r}; known kinds: {', '.join(KINDS)}")
    found: dict = {}
    owners: dict = {}
    for impl in getattr(plugin_manager().hook, f"register_{kind}").get_hookimpls():  # in registration order

        def register(name, value, _plugin=impl.plugin_name):
            if name in found:
                singular = kind[:-1].replace("_", " ")
                raise DuplicateNameError(
                    f"{singular} {name!r} is registered by both plugin {owners[name]!r} and plugin "
                    f"{_plugin!r}: rename one of them (or uninstall one; FWDGRAD_LOAD_PLUGINS=0 "
                    "loads the built-in plugins only)."
                )
            found[name], owners[name] = value, _plugin

        impl.function(register=register)
    return found


def registered(kind: str) -> list[str]:
    """The sorted names registered for ``kind`` (one of ``KINDS``)."""
    return sorted(_collect(kind))


def get(kind: str, name: str):
    """What ``name`` was registered with for ``kind``; an unknown name lists the known ones."""
    found = _collect(kind)
    if name not in found:
        singular = kind[:-1].replace("_", " ")
        raise UnknownNameError(
            f"unknown {singular} {name!r}; registered: {', '.join(sorted(found)) or 'none'}. "
            f"Run `python -m fwdgrad_plugins list` to see every plugin."
        )
    value = found[name]
    if kind == "integrations" and isinstance(value, str):
        module, _, attribute = value.partition(":")
        value = getattr(importlib.import_module(module), attribute)
    return value
