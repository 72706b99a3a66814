"""What a run records about itself in ``RUN/run_info.json`` (read by the reports' run summary):
software versions, model size, processes and device, what it saw, when it started and finished."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("weightgeom-harness", "torch", "transformers", "accelerate", "trl", "peft", "datasets")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def now() -> str:
    """UTC time to the second, ISO 8601."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def model_facts(model) -> dict[str, int]:
    """Parameter counts (tied weights counted once) of the model a phase trains."""
    params = list(model.parameters())
    return {"n_params": sum(p.numel() for p in params),
            "n_trainable_params": sum(p.numel() for p in params if p.requires_grad)}
