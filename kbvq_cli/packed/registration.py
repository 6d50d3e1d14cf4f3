"""Register kbvq with transformers on `import kbvq_cli`, without importing transformers or torch.

`import kbvq_cli` must be enough for `AutoModelForCausalLM.from_pretrained(pack_dir)`, yet `kbvq --help`
must not pay for torch and transformers (seconds). So `install()` registers at once when transformers'
quantizer registry (`transformers.quantizers.auto`) is already imported, and otherwise adds an import
hook that registers right after that module has run: transformers imports it with `modeling_utils`, on
the first `from_pretrained` at the latest. The hook then removes itself. Standard library only here.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

REGISTRY_MODULE = "transformers.quantizers.auto"
QUANTIZER_MODULE = "kbvq_cli.packed.quantizer"


def _register() -> None:
    # Importing the quantizer module registers it. If that module is what is importing transformers'
    # registry right now, it is in sys.modules half-run, and registers when its import finishes.
    importlib.import_module(QUANTIZER_MODULE)


class _RegisterAfterLoading(importlib.abc.Loader):
    """Runs the registry module with its own loader, then registers kbvq in it."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _remove_hook()
        try:
            _register()
        except Exception as error:  # never break transformers' own import: packs then fail to load, saying why
            warnings.warn(f"kbvq could not register its quantization method with transformers: {error!r}",
                          RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_source, get_data, ... as the wrapped loader has them
        return getattr(self.loader, name)


class _RegistryImportHook(importlib.abc.MetaPathFinder):
    """Finds `transformers.quantizers.auto` with the other finders and wraps its loader."""

    def __init__(self):
        self.searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE or self.searching:
            return None
        self.searching = True  # the search below asks every finder, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegistryImportHook)]


def install() -> None:
    """Make sure kbvq is registered with transformers by the time it loads a model (idempotent)."""
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegistryImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryImportHook())
