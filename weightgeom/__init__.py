"""weightgeom: live weight-geometry instruments for transformer training.

Where pretraining writes and alignment reads: forward, backward and optimizer hooks accumulate each
linear layer's input-activation covariance ``C_a``, upstream-gradient covariance ``C_delta`` and
weight updates while a model trains, and stream relative subspace fractions, z-scores, eigengaps and
spikiness from them (docs/metrics.md).

The public API is importable from here; each name loads its module on first use, so ``import
weightgeom`` itself is light (no torch)::

    from weightgeom import InstrumentSuite
    suite = InstrumentSuite(model, k=8, every_n=20)

Subpackages: ``weightgeom.hooks`` (instruments and their math, plain torch), ``weightgeom.core``
(config, data, models, checkpoints, sinks), ``weightgeom.trainers`` (the loops and the HF
callback), ``weightgeom.harness`` (CLI, pipeline, reports, compare, rank-1), ``weightgeom.recipes``
(the bundled YAML recipes, package data).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "InstrumentSuite": "weightgeom.hooks.suite",
    "NullSuite": "weightgeom.hooks.suite",
    "SuiteConfig": "weightgeom.hooks.suite",
    "build_suite": "weightgeom.hooks.suite",
    "Suite": "weightgeom.hooks.protocol",
    "ARCHITECTURES": "weightgeom.hooks.roles",
    "ArchSpec": "weightgeom.hooks.roles",
    "Fused": "weightgeom.hooks.roles",
    "RoleSpec": "weightgeom.hooks.roles",
    "resolve_tracked": "weightgeom.hooks.roles",
    "RunConfig": "weightgeom.core.config",
    "load_config": "weightgeom.core.config",
    "read_metrics": "weightgeom.core.sinks",
    "WeightGeomCallback": "weightgeom.trainers.callback",
    "run_recipe": "weightgeom.harness.pipeline",
    "write_report": "weightgeom.harness.pipeline",
    "compare": "weightgeom.harness.compare.analysis",
    "compare_init": "weightgeom.harness.compare.init",
    "compare_series": "weightgeom.harness.compare.series",
    "CompareOptions": "weightgeom.harness.compare.options",
    "run_rank1": "weightgeom.harness.rank1.experiment",
}

__all__ = [
    "ARCHITECTURES", "ArchSpec", "CompareOptions", "Fused", "InstrumentSuite", "NullSuite", "RoleSpec", "RunConfig",
    "Suite", "SuiteConfig", "WeightGeomCallback", "__version__", "build_suite", "compare", "compare_init",
    "compare_series", "load_config",
    "read_metrics", "resolve_tracked", "run_rank1", "run_recipe", "write_report",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily (__getattr__)
    from weightgeom.core.config import RunConfig, load_config
    from weightgeom.core.sinks import read_metrics
    from weightgeom.harness.compare.analysis import compare
    from weightgeom.harness.compare.init import compare_init
    from weightgeom.harness.compare.options import CompareOptions
    from weightgeom.harness.compare.series import compare_series
    from weightgeom.harness.pipeline import run_recipe, write_report
    from weightgeom.harness.rank1.experiment import run_rank1
    from weightgeom.hooks.protocol import Suite
    from weightgeom.hooks.roles import ARCHITECTURES, ArchSpec, Fused, RoleSpec, resolve_tracked
    from weightgeom.hooks.suite import InstrumentSuite, NullSuite, SuiteConfig, build_suite
    from weightgeom.trainers.callback import WeightGeomCallback


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 (only when asked)

        try:
            return version("weightgeom-harness")
        except PackageNotFoundError:
            return "0+unknown"
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightgeom' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
