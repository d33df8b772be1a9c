"""A package's public names imported on first use (PEP 562), so that importing the package loads no torch.

``di-star`` and the trainer import ``diffusers_di_star`` (its log filters, its torch-free ``defaults``) to check their
flags; the pipelines, losses and training code load when a name is first used, e.g.
``from diffusers_di_star import DIStarSDXLPipeline``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` of ``package`` whose ``exports`` map each relative sub-module
    (``".losses"``) to the public names it defines. A name is imported on first access, then kept as an attribute."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
