"""A registry of named, pluggable objects (projection methods, cost models), extended by entry points.

Installed distributions add objects through an entry-point group; they are loaded on first use,
once. A plugin that fails to load is skipped with a warning: a plugin must never take the tool down.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one ``kind`` (e.g. "projection method") with ``name``, ``description`` and a ``call``-named method."""

    def __init__(self, kind: str, group: str, protocol: type, call: str, signature: str) -> None:
        self.kind, self.group, self.protocol, self.call, self.signature = kind, group, protocol, call, signature
        self.items: dict[str, T] = {}
        self.plugins_loaded = False

    def register(self, name: str, obj: T, *, replace: bool = False) -> None:
        """Add ``obj`` under ``name`` (which must equal ``obj.name``)."""
        if not isinstance(obj, self.protocol) or not callable(getattr(obj, self.call, None)):
            raise TypeError(f"{self.kind} {name!r} must have `name`, `description` and `{self.call}{self.signature}`")
        if obj.name != name:
            raise ValueError(f"{self.kind} object is named {obj.name!r} but registered as {name!r}")
        if name in self.items and not replace:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self.items[name] = obj

    def names(self) -> list[str]:
        """Names of all objects, built-in and plugins, sorted."""
        self._load_plugins()
        return sorted(self.items)

    def get(self, name: str) -> T:
        """The object registered as ``name``; ValueError listing the available ones otherwise."""
        self._load_plugins()
        try:
            return self.items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def _load_plugins(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        for ep in metadata.entry_points(group=self.group):
            try:
                obj = ep.load()
                # an entry point may name a class (instantiated here) or a ready object
                self.register(ep.name, obj() if isinstance(obj, type) or not hasattr(obj, self.call) else obj)
            except Exception as err:  # a plugin must never take the tool down with it
                warnings.warn(f"skipping {self.kind} plugin '{ep.name}' (entry point '{ep.value}' in group "
                              f"'{self.group}'): {type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)
