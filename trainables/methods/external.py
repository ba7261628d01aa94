"""Methods from the user's own code, and where every method's code came from.

A user method is a module outside this package that registers a `MethodInfo` on import, exactly
as the built-in modules do (`tests/example_method/petl_example_method.py` is a documented
example). Two ways in, no fork of the project:

- `--methods my_pkg.my_method`: the study imports the module on the driver (`load_modules`),
  and every process of the study (Ray workers on every node, memory-estimate tasks) imports it
  again when it imports `trainables.methods`: the module paths travel in the environment
  variable `PETL_METHOD_MODULES`, the code itself in Ray's `runtime_env` (`worker_runtime_env`).
- an installed package's entry point in the group `petl_study.methods` (e.g. in its
  pyproject.toml: `[project.entry-points."petl_study.methods"] my_method = "my_pkg.my_method"`):
  loaded whenever `trainables.methods` is imported, on every node the package is installed on.

`provenance(name)` is what every trial row records of its method's code: module, version
(the installed distribution's, else the module's `__version__`) and a hash of the module file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainables.methods.base import REGISTRY, MethodInfo

ENV_VAR = "PETL_METHOD_MODULES"  # comma-separated module paths every process of a study imports
ENTRY_POINT_GROUP = "petl_study.methods"
BUILTIN_PREFIX = "trainables.methods."


def module_of(info: MethodInfo) -> str:
    """The module that registered a method (where its `apply` is defined)."""
    return getattr(info.apply, "__module__", None) or "?"


def is_builtin(name: str) -> bool:
    return name in REGISTRY and module_of(REGISTRY[name]).startswith(BUILTIN_PREFIX)


def _import(path: str, how: str) -> list[str]:
    """Import a module; the names of the methods it registered (also when it was imported before)."""
    before = set(REGISTRY)
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ValueError(f"{how} {path!r}: cannot import it ({e}); is it installed, or on PYTHONPATH?") from None
    except Exception as e:  # the user's code may raise anything on import
        raise ValueError(f"{how} {path!r}: importing it raised {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    file = getattr(module, "__file__", None)
    names = [n for n, info in REGISTRY.items() if n not in before or module_of(info) == module.__name__
             or (file and getattr(sys.modules.get(module_of(info)), "__file__", None) == file)]
    if not names:
        raise ValueError(f"{how} {path!r} registers no method: it must call "
                         "trainables.methods.base.register(MethodInfo(...)) on import")
    return names


def looks_like_module(entry: str) -> bool:
    """`my_pkg.my_method` (a dotted module path) or an importable top-level module, not a method name or a
    NAME@QUANT+gc spec (an unknown name stays a name: get_method then lists the valid ones)."""
    if entry in REGISTRY or not all(p.isidentifier() for p in entry.split(".")):
        return False
    if "." in entry:
        return True
    try:
        return importlib.util.find_spec(entry) is not None
    except (ImportError, ValueError):
        return False


def load_modules(entries: Sequence[str] | None) -> list[str] | None:
    """`--methods` entries with each module path imported and replaced by the names it registers.

    The module paths are also put in `PETL_METHOD_MODULES`, so every process the study starts (a
    local Ray inherits this environment; a cluster gets it through `worker_runtime_env`) imports them.
    Raises ValueError (one line) for a module that cannot be imported or registers nothing."""
    if entries is None:
        return None
    out: list[str] = []
    modules = [m for m in os.environ.get(ENV_VAR, "").split(",") if m]
    for entry in entries:
        if not looks_like_module(entry):
            out.append(entry)
            continue
        out.extend(_import(entry, "--methods module"))
        if entry not in modules:
            modules.append(entry)
    if modules:
        os.environ[ENV_VAR] = ",".join(modules)
    return list(dict.fromkeys(out))


def load_environment() -> None:
    """Import the modules `PETL_METHOD_MODULES` names (a study's worker process: the driver named them)."""
    for path in filter(None, os.environ.get(ENV_VAR, "").split(",")):
        try:
            _import(path.strip(), f"{ENV_VAR} module")
        except ValueError as e:  # a worker that cannot import it: the trial fails naming it
            warnings.warn(str(e), stacklevel=2)


ENTRY_POINT_ERRORS: dict[str, str] = {}  # entry point name -> why it failed to load (named by get_method)


def load_entry_points() -> None:
    """Import every installed `petl_study.methods` entry point; a broken one is remembered, not fatal,
    so that one bad package does not stop studies that do not use it."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, MethodInfo) and loaded.name not in REGISTRY:
                from trainables.methods.base import register

                register(loaded)
        except Exception as e:  # the user's code may raise anything on import
            ENTRY_POINT_ERRORS[ep.name] = f"entry point {ep.name} = {ep.value}: {type(e).__name__}: {e}"


def _top_level(module_name: str) -> types.ModuleType | None:
    return sys.modules.get(module_name.split(".", 1)[0])


def _installed(module: types.ModuleType) -> bool:
    file = str(getattr(module, "__file__", "") or "")
    return "site-packages" in file or "dist-packages" in file


def worker_runtime_env() -> dict[str, Any] | None:
    """Ray's runtime_env for a study with user modules: their names in the environment and, for code not
    installed as a package, the code itself (`py_modules`: Ray ships it to every node). None without any."""
    modules = [m for m in os.environ.get(ENV_VAR, "").split(",") if m]
    if not modules:
        return None
    ship = []
    for m in modules:
        top = _top_level(m)
        if top is not None and not _installed(top) and top not in ship:
            ship.append(top)
    return {"env_vars": {ENV_VAR: ",".join(modules)}, **({"py_modules": ship} if ship else {})}


@functools.cache
def _file_hash(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _version(module_name: str) -> str | None:
    """The installed distribution's version of the module's top-level package (built-ins: petl-study's),
    else its `__version__`."""
    top = module_name.split(".", 1)[0]
    for dist in _distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    for name in (module_name, top):
        version = getattr(sys.modules.get(name), "__version__", None)
        if version is not None:
            return str(version)
    return None


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed package: once per process


@functools.cache
def provenance(name: str) -> dict[str, str | None]:
    """`method_module`, `method_version`, `method_hash` (sha256 of the module file, first 16 hex) of a method."""
    module_name = module_of(REGISTRY[name])
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    return {"method_module": module_name, "method_version": _version(module_name),
            "method_hash": _file_hash(file) if file else None}
