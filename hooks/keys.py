"""Metric and state key names: built and parsed here, and nowhere else.

Streamed metrics are flat ``{key: float}`` rows with slash-namespaced keys (JSONL rows, TensorBoard
tags). The geometry keys have one of three shapes::

    {family}/L{layer}/{name}            rsf_in/L3/q        (name = role, or input group for spike_in)
    {family}/all/{name}                 rsf_in/all/q       (mean over layers)
    {family}/L{layer}/{name}/{stat}     spike_out/L3/o/top1
    {family}                            gap_pred           (model level)

Instrument state (safetensors snapshots) uses the same layout with its own families
(``cov_in/L0/attn_in/sum_outer``, ``weights/L0/q/W0``). docs/architecture.md lists every family.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL = "all"  # the layer label of a mean over layers

# State families of instrument snapshots (docs/architecture.md, "Instrument state").
COV_IN, COV_OUT, WEIGHTS, FROZEN_IN, PRED, META = "cov_in", "cov_out", "weights", "frozen_in", "pred", "meta"
CURVE_IN = "curve_in"  # the cumulative delta's energy along the top eigenvectors of C_a (the reports' k-curves)
CURVE_MASS = "curve_mass"  # C_delta's energy along the prediction subspace's directions (the mass k-curves)
WEIGHT_STEPS = f"{WEIGHTS}/steps"
W_U, GAIN = f"{PRED}/W_U", f"{PRED}/gain"  # in snapshots written before 2026-12-07 only

# Relative-RSF families, each with a z-score family for the cumulative delta (None: no z-score).
RSF_FAMILIES = {"rsf_in": "z_in", "rsf_out_pred": "z_out_pred", "rsf_out_delta": "z_out_delta"}
# Views of a weight matrix and the suffix their RSF family carries: the cumulative delta since the
# phase start, the last optimizer update, the last raw gradient.
VIEWS = ("", "_update", "_grad")
# Families averaged over layers into ``{family}/all/{name}``.
LAYER_MEAN_PREFIXES = ("rsf_", "z_", "mass_")


@dataclass(frozen=True)
class Key:
    """A parsed metric or state key. ``layer`` is an int, or None for ``all`` and model-level keys."""

    family: str
    layer: int | None = None
    name: str | None = None
    stat: str | None = None
    mean: bool = False  # ``{family}/all/{name}``

    def __str__(self) -> str:
        parts = [self.family]
        if self.mean:
            parts.append(ALL)
        elif self.layer is not None:
            parts.append(f"L{self.layer}")
        parts += [p for p in (self.name, self.stat) if p is not None]
        return "/".join(parts)


def metric(family: str, layer: int | None = None, name: str | None = None, stat: str | None = None) -> str:
    """``metric("rsf_in", 3, "q") == "rsf_in/L3/q"``; ``layer=None`` with a name gives the layer mean."""
    return str(Key(family, layer, name, stat, mean=layer is None and name is not None))


def layer_mean(family: str, name: str) -> str:
    """``layer_mean("rsf_in", "q") == "rsf_in/all/q"``."""
    return metric(family, None, name)


def family(key: str) -> str:
    """The first segment: ``family("rsf_in/L3/q") == "rsf_in"``, ``family("train/loss") == "train"``."""
    return key.split("/", 1)[0]


def parse(key: str) -> Key | None:
    """The structure of a layer-indexed or layer-mean key, or None for anything else
    (``train/loss``, ``gap_pred``, malformed keys)."""
    parts = key.split("/")
    if len(parts) < 3:
        return None
    family, where, name, *rest = parts
    if len(rest) > 1:
        return None
    stat = rest[0] if rest else None
    if where == ALL:
        return Key(family, None, name, stat, mean=True)
    if where.startswith("L") and where[1:].isdigit():
        return Key(family, int(where[1:]), name, stat)
    return None


def layer_of(key: str, family: str) -> tuple[int, str] | None:
    """``(layer, name)`` when ``key`` is ``{family}/L{i}/{name}`` (no stat), else None."""
    k = parse(key)
    if k is None or k.family != family or k.layer is None or k.stat is not None:
        return None
    return k.layer, k.name


def matrix_key(layer: int, name: str) -> str:
    """The per-matrix (or per-input-group) suffix ``L{layer}/{name}`` used inside metric and state keys."""
    return f"L{layer}/{name}"


def at(family: str, suffix: str, stat: str | None = None) -> str:
    """A key of ``family`` at a matrix or group suffix: ``at("rsf_in", "L3/q") == "rsf_in/L3/q"``,
    ``at("spike_in", "L3/attn_in", "top1") == "spike_in/L3/attn_in/top1"``."""
    return f"{family}/{suffix}" if stat is None else f"{family}/{suffix}/{stat}"


def state_key(family: str, suffix: str, field: str) -> str:
    """``state_key("cov_in", "L0/attn_in", "sum_outer") == "cov_in/L0/attn_in/sum_outer"``."""
    return f"{family}/{suffix}/{field}"


def parse_state_key(key: str) -> tuple[str, int, str, str] | None:
    """``(family, layer, name, field)`` of ``{family}/L{i}/{name}/{field}``, else None."""
    parts = key.split("/")
    if len(parts) != 4 or not (parts[1].startswith("L") and parts[1][1:].isdigit()):
        return None
    return parts[0], int(parts[1][1:]), parts[2], parts[3]


def layer_means(metrics: dict[str, float]) -> dict[str, float]:
    """``{family}/all/{name}``: mean over layers of ``{family}/L{i}/{name}`` for the RSF and z families."""
    groups: dict[str, list[float]] = {}
    for key, value in metrics.items():
        k = parse(key)
        if k is not None and k.layer is not None and k.stat is None and k.family.startswith(LAYER_MEAN_PREFIXES):
            groups.setdefault(layer_mean(k.family, k.name), []).append(value)
    return {key: sum(v) / len(v) for key, v in groups.items()}
