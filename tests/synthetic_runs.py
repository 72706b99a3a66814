"""Synthetic run directories for the report tests: the files a pipeline saves (config.yaml,
metrics.jsonl per phase), with planted numbers, written without training anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

K = 4
# The embedded hidden-512 run that memorised its corpus (measured on an H200): held-out loss from
# step 1000 on, while the training loss fell to 0.03.
MEMORISING_EVAL = {500: 2.61, 1000: 2.30, 1500: 2.62, 2000: 3.15, 2500: 3.40}
MEMORISING_TRAIN_END = 0.03


def config(objectives: list[dict], *, pretrain: bool = True, k: int = K, init_from: str | None = None) -> dict:
    return {"name": "synthetic", "seed": 7, "init_from": init_from,
            "stages": (["pretrain"] if pretrain else []) + ["align", "report"],
            "model": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4},
            "data": {"seq_len": 32},
            "train": {"steps": 2500, "batch_size": 8, "grad_accum": 1},
            "instruments": {"k": k, "every_n": 10, "zscores": True},
            "align": {"objectives": objectives, "train": {"steps": 40, "batch_size": 8, "grad_accum": 1}}}


def geometry(read: dict[str, float], write: dict[str, float], z: float = 8.0, layers: int = 2) -> dict:
    """A geometry row: relative RSF_in for ``read`` roles, RSF_out(pred) for ``write`` roles, the same
    value in every layer (so the layer mean is that value), z-scores ``z``, spikiness of C_a."""
    row: dict[str, float] = {}
    for role, value in read.items():
        for i in range(layers):
            row[f"rsf_in/L{i}/{role}"] = value
        row[f"rsf_in/all/{role}"] = value
        row[f"z_in/all/{role}"] = z
    for role, value in write.items():
        for i in range(layers):
            row[f"rsf_out_pred/L{i}/{role}"] = value
        row[f"rsf_out_pred/all/{role}"] = value
        row[f"z_out_pred/all/{role}"] = z
    for i in range(layers):
        row.update({f"spike_in/L{i}/attn_in/top1": 0.4, f"spike_in/L{i}/attn_in/topk": 0.6,
                    f"spike_in/L{i}/attn_in/pr": 5.0, f"spike_in/L{i}/attn_in/erank": 7.0})
    return row


def write_rows(path: Path, rows: list[dict]) -> None:
    """metrics.jsonl as the JSONL sink writes it (non-finite values as null)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        lines.append(json.dumps(clean))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def pretrain_rows(memorising: bool, geo: dict) -> list[dict]:
    """CE pretraining over 2,500 steps: training loss every 100 steps, held-out loss every 500; the
    held-out loss either follows MEMORISING_EVAL or keeps falling (healthy)."""
    rows = []
    for step in range(100, 2501, 100):
        train = 4.0 * (MEMORISING_TRAIN_END / 4.0) ** (step / 2500) if memorising else 4.0 - step / 1000
        row = {"step": step, "phase": "pretrain", "train/loss": train}
        if step % 500 == 0:
            row["eval/loss"] = MEMORISING_EVAL[step] if memorising else 4.2 - step / 1000
        rows.append(row)
    rows[-1].update(geo)
    return rows


def alignment_rows(name: str, geo: dict, accuracy: float = 0.9, margin: float = 0.5) -> list[dict]:
    rows = [{"step": s, "phase": f"align/{name}", "pref/loss": 0.69 - s / 200, "pref/accuracy": accuracy,
             "pref/margin": margin} for s in range(5, 41, 5)]
    rows[-1].update(geo)
    return rows


def pipeline(root: Path, *, pretrain: bool = True, memorising: bool = False, read_dpo: dict | None = None,
             k: int = K, align_accuracy: float = 0.9) -> Path:
    """A pipeline directory: CE pretraining (optional) and dpo plus the graded family g0, g0.5, g1."""
    objectives = [{"name": "dpo", "loss": "trl", "loss_type": "sigmoid"},
                  {"name": "g0.00", "loss": "graded", "grade": 0.0},
                  {"name": "g0.50", "loss": "graded", "grade": 0.5},
                  {"name": "g1.00", "loss": "graded", "grade": 1.0}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config(objectives, pretrain=pretrain, k=k,
                                                            init_from=None if pretrain else "/models/base")))
    controls = {"v": 2.0, "gate": 2.2, "up": 1.8}
    if pretrain:
        write_rows(root / "pretrain", pretrain_rows(memorising, geometry({"q": 2.5, "k": 2.5, **controls},
                                                                         {"o": 4.0, "down": 3.6})))
    read = read_dpo or {"q": 6.0, "k": 5.0, **controls}
    for name, write in (("dpo", 1.2), ("g0.00", 1.6), ("g0.50", 1.3), ("g1.00", 1.0)):
        write_rows(root / "align" / name, alignment_rows(name, geometry(read, {"o": write, "down": write}),
                                                         accuracy=align_accuracy))
    return root
