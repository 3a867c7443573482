"""A tiny name -> class registry, shared by algorithms and datasets."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes registered under a name by a decorator; modules of a package load on first use.

    ``package`` is imported module by module (every ``*.py`` in it) the first time a name is
    looked up, so that a new module with ``@registry.register("Name")`` is found with no
    other edit.
    """

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._classes: Dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(cls: T) -> T:
            existing = self._classes.get(name)
            # the same class seen twice (a module imported under two names) is fine; another class is not
            same = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
            if existing is not None and existing is not cls and not same:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing.__module__}")
            self._classes[name] = cls
            cls.NAME = name
            return cls

        return decorator

    def _load_package(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> List[str]:
        self._load_package()
        return sorted(self._classes)

    def get(self, name: str) -> T:
        self._load_package()
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._classes[name]
