"""The C++ core, built once per instruction-set level: the highest level this CPU runs, or the one
the environment variable CRF_EXT_ISA names (a lower one: for tests, and to see what a level is worth).

Every level computes the same bits (no FMA contraction, the same operation order).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from crf_ext import _cpu

ENV = "CRF_EXT_ISA"
# Highest first. "native" (-march=native) is built only on request, for the building machine.
LEVELS = ("native", "avx512", "avx2", "sse4.2", "generic")


def _module_name(level: str) -> str:
    return "crf_ext._core_" + level.replace(".", "_")


def built_levels() -> list[str]:
    """The levels this installation has a module for, highest first."""
    return [level for level in LEVELS if importlib.util.find_spec(_module_name(level)) is not None]


def runnable_levels() -> list[str]:
    """The built levels this CPU runs, highest first."""
    return [level for level in built_levels() if _cpu.supports(level)]


def load(level: str) -> ModuleType:
    """The core module of `level`; ImportError if it is not built or this CPU cannot run it."""
    if level not in LEVELS:
        raise ImportError(f"crf_ext: unknown instruction-set level {level!r}; the levels are {', '.join(LEVELS)}")
    if level not in built_levels():
        raise ImportError(f"crf_ext: level {level!r} is not built in this installation (built: "
                          f"{', '.join(built_levels()) or 'none'})")
    if not _cpu.supports(level):
        raise ImportError(f"crf_ext: this CPU cannot run level {level!r} (it runs: "
                          f"{', '.join(runnable_levels()) or 'none of the built levels'})")
    return importlib.import_module(_module_name(level))


def _select() -> str:
    forced = os.environ.get(ENV, "").strip()
    if forced:
        return forced
    runnable = runnable_levels()
    if not runnable:
        raise ImportError(f"crf_ext: this CPU runs none of the built levels ({', '.join(built_levels()) or 'none'}); "
                          "build from source for it: pip install --no-binary crf-ext crf-ext")
    return runnable[0]


core = load(_select())
