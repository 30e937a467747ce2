"""Registers lowbit's transformers quantizer (:mod:`lowbit.io.hf_quantizer`) without importing transformers.

``import lowbit`` calls :func:`install`: if transformers' quantizer registry (``transformers.quantizers.auto``, which
``from_pretrained`` imports) is already loaded, the quantizer is registered now; otherwise a one-shot import hook
registers it right after that module is first imported. So ``import lowbit`` costs no transformers or torch import,
and nothing happens where transformers is absent. A failure to register (transformers too old) is a warning, never
an error inside transformers' own import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from types import ModuleType
from typing import Any

REGISTRY = "transformers.quantizers.auto"


def install() -> None:
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _register() -> None:
    try:  # the module registers itself when imported (also when imported first, as lowbit.LowbitConfig's home)
        importlib.import_module("lowbit.io.hf_quantizer")
    except Exception as e:  # inside transformers' import: a failure here must not break transformers
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        warnings.warn(f"lowbit: transformers {version} cannot load lowbit checkpoints through from_pretrained "
                      f"({type(e).__name__}: {e}); use lowbit.load(dir)", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the registry module, it wraps the real loader so :func:`_register` runs after it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)  # one shot; the search below must not find this finder again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)
