"""Packages that load their public names on first use (PEP 562).

``python -m flamingo_vlm.train`` (what torchrun launches) imports the package before its
``__main__``, which must choose the memory allocator (:mod:`flamingo_vlm.allocator`) before torch is
imported; so the package ``__init__`` files import nothing heavy and hand their names to this.
Standard library only.
"""

from __future__ import annotations

import importlib


def lazy_names(package: str, names: dict[str, str | tuple[str, str]]):
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the module
    (relative to the package) that defines it, or to ``(module, name there)``; each is imported on
    first use and kept."""
    module = importlib.import_module(package)

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where, attr = names[name] if isinstance(names[name], tuple) else (names[name], name)
        value = getattr(importlib.import_module(where, package), attr)
        setattr(module, name, value)
        return value

    def __dir__():
        return sorted([*vars(module), *names])

    return __getattr__, __dir__


def lazy_function(module: str, name: str):
    """A function that imports ``module`` on its first call and calls ``module.name``: a command's
    handler, stored on its parser without importing what the handler needs (torch, for most) while
    the parser is built."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{name}"
    return call
