"""A tiny name -> class registry, shared by algorithms and datasets."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T", bound=type)

PLUGINS_ENV = "DOMAINBED_SIL_PLUGINS"


def import_plugin(entry: str) -> None:
    """Import one ``$DOMAINBED_SIL_PLUGINS`` entry: a ``.py`` file or an importable module name.

    A file is imported once per process under ``domainbed_sil_plugin_<stem>``; its
    ``@register_algorithm`` / ``@register_dataset`` decorators do the registering.
    """
    if not entry.endswith(".py"):
        try:
            importlib.import_module(entry)
        except ModuleNotFoundError as err:
            raise ValueError(f"${PLUGINS_ENV}: cannot import module {entry!r} ({err}); expected "
                             f"{os.pathsep}-separated .py files or importable module names") from err
        return
    path = Path(entry).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"${PLUGINS_ENV}: no file {path} (expected {os.pathsep}-separated .py files or module names)")
    # the path's hash keeps two plugin files with the same name apart
    name = f"domainbed_sil_plugin_{path.stem}_{hashlib.md5(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _source(cls: type) -> str:
    """The file that defines ``cls`` (its module's name when it has no file)."""
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None) or cls.__module__


def import_plugins() -> None:
    """Import every entry of ``$DOMAINBED_SIL_PLUGINS`` (algorithms or datasets kept outside the package)."""
    for entry in os.environ.get(PLUGINS_ENV, "").split(os.pathsep):
        if entry.strip():
            import_plugin(entry.strip())


class Registry(Generic[T]):
    """Classes registered under a name by a decorator; modules of a package load on first use.

    ``package`` is imported module by module (every ``*.py`` in it) the first time a name is
    looked up, so that a new module with ``@registry.register("Name")`` is found with no
    other edit; then the plugins named by ``$DOMAINBED_SIL_PLUGINS`` (files or modules
    outside the package, e.g. a user's own algorithm next to a pip-installed package).
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
                raise ValueError(f"{self.kind} {name!r} is defined twice: in {_source(existing)} and in {_source(cls)}; "
                                 f"keep one (a plugin file must not repeat a module of the package)")
            self._classes[name] = cls
            cls.NAME = name
            return cls

        return decorator

    def _load_package(self) -> None:
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        import_plugins()
        self._loaded = True  # only now: a plugin that failed is retried (and fails again) on the next lookup

    def names(self) -> List[str]:
        self._load_package()
        return sorted(self._classes)

    def get(self, name: str) -> T:
        self._load_package()
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._classes[name]
