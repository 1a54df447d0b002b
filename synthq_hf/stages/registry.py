"""Which stages a recipe can name: every stage module's ``STEPS``, found by walking this package.

Adding a stage is adding a module that ends with ``STEPS = [Step(...)]``; nothing else names it. Modules whose
name starts with ``_`` (helpers) and this one are skipped. Importing a stage module is cheap: heavy libraries
(torch, bertopic, transformers) are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from synthq_hf.stages._step import Step


@cache
def steps() -> dict[str, Step]:
    """Stage name → :class:`Step`, in module order (the order ``synthq run --help`` and errors list them)."""
    import synthq_hf.stages as package

    found: dict[str, Step] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "registry":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for step in getattr(module, "STEPS", ()):
            if step.name in found:
                raise RuntimeError(f"stage {step.name!r} is declared twice ({module.__name__})")
            found[step.name] = step
    return found
