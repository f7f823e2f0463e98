"""Named registries: the one place each named extension point is looked up.

- `CHAT_TEMPLATES`: chat formats (`rose_pl.data.templates`: tulu, chatml, tokenizer).
- `PROJECTORS`: random projections of gradients (`rose_pl.features.projection`: countsketch, gaussian, identity, trak).
- `METHODS`: selection methods (`rose_pl.selection.methods`: rose, less, random, bm25, rds).

(Objectives and gradient transforms need no registry: they are classes, injected by class path in YAML.)

A registry maps a name to an entry. Built-in entries are registered by their own module, which the registry
imports by name the first time it is asked (so this module imports nothing of the package but `errors` and
sits at the bottom of the layering). A name that is not registered but looks like an import path
(`package.module.NAME`) is imported and registered under that path, so a YAML file can name an entry defined
in the user's own code.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from rose_pl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name; `builtins` are module paths imported on first use."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = (), check: Callable[[object], bool] | None = None):
        self.kind = kind
        self._builtins = builtins
        self._loaded = False
        self._check = check
        self._entries: dict[str, T] = {}

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: str, entry: T, replace: bool = False) -> T:
        """Add `entry` under `name`; registering a different entry under a taken name needs `replace`."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{self.kind} name {name!r} must be a non-empty string without '/'")
        if self._check is not None and not self._check(entry):
            raise ConfigError(f"{self.kind} {name!r}: {entry!r} is not a valid {self.kind}")
        if name in self._entries and self._entries[name] is not entry and not replace:
            raise ConfigError(f"{self.kind} {name!r} is registered already (pass replace=True to replace it)")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called `name`, or the object at import path `name` (then registered under that path)."""
        self._load()
        if name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and "." in name.strip("."):
            module, _, attr = name.rpartition(".")
            try:
                entry = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{self.kind} {name!r}: not registered, and importing it failed ({e})") from None
            return self.register(name, entry)
        raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())} "
                          "(or an import path package.module.NAME)")

    def names(self) -> list[str]:
        """Registered names in registration order (built-ins first)."""
        self._load()
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


CHAT_TEMPLATES: Registry = Registry("chat template", builtins=("rose_pl.data.templates",))
"""Chat templates (`ChatTemplate` objects) by name."""
PROJECTORS: Registry = Registry("projector", builtins=("rose_pl.features.projection",))
"""Projector classes (`Projector` subclasses) by kind."""
METHODS: Registry = Registry("selection method", builtins=("rose_pl.selection.methods",))
"""Selection methods (`SelectionMethod` objects) by name."""
