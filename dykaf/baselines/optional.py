"""pytorch-optimizer, the library's one optional dependency, imported where a baseline needs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def pytorch_optimizer(baseline: str, submodule: str = "") -> ModuleType:
    """``pytorch_optimizer`` (or its ``submodule``, e.g. ``optimizer.utils.graft``), or an ImportError
    that says how to install it.

    pytorch-optimizer is the library's optional ``baselines`` extra: the library itself stays
    importable with torch only, so this is the one ImportError guard it has (modules that ship in
    the same wheel are imported plainly).
    """
    try:
        return importlib.import_module(".".join(filter(None, ("pytorch_optimizer", submodule))))
    except ImportError as error:
        raise ImportError(
            f"the {baseline} baseline needs pytorch-optimizer: pip install 'dykaf-lab[baselines]'"
        ) from error
