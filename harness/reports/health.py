"""Run-health checks: did the run train the way a reader would assume before trusting its geometry?

Pure functions of saved metric rows (and instrument snapshots). Each check returns
:class:`HealthWarning` records (a visible block at the top of every report, and ``health.json``)
and :class:`HealthNote` records (a check that could not run, and why). The rules, stated in the
report next to the warnings:

* **memorisation**: the held-out loss (``eval/loss`` in pretraining rows, ``eval/pref_loss`` in
  alignment rows) at its last logged point exceeds its minimum by more than ``MEMORISE_RISE`` of
  that minimum, while the training loss (``train/loss``, ``pref/loss``) at the last logged point is
  below its value at the minimum's step. A model that memorises its training set keeps driving the
  training loss down while the held-out loss climbs.
* **preference at chance**: an alignment phase's preference accuracy is not above the upper edge of
  the two-sided 95% binomial band around 0.5, ``0.5 + 1.96 sqrt(0.25 / n)`` for ``n`` pairs, or its
  mean reward margin is not above zero. Held-out: the last ``eval/pref_accuracy`` over the
  ``n_eval_pairs`` the run recorded (``run_info.json``); training: ``pref/accuracy`` pooled over the
  last ``TRAIN_ROWS`` logged rows, each over one optimizer step's ``batch_size * grad_accum`` pairs.
* **non-finite**: a loss, accuracy or geometry value in the rows, or a tensor of a snapshot, is NaN
  or infinite (the JSONL sink writes non-finite values as ``null``, read back as NaN): the run
  diverged or a metric is undefined, and the numbers built on it are not reported as measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from weightgeom.core.sinks import json_safe
from weightgeom.hooks import keys

MEMORISE_RISE = 0.05  # held-out loss above its minimum by more than 5% of the minimum
CHANCE_Z = 1.96  # two-sided 95% band of a fair coin's success rate
TRAIN_ROWS = 5  # logged training rows pooled for the training preference accuracy
SERIES_POINTS = 8  # at most this many points of a series printed in a warning

TRAINING_FAMILIES = ("train", "eval", "pref")  # loss/accuracy keys; everything else is geometry
LOSS_PAIRS = (("train/loss", "eval/loss"), ("pref/loss", "eval/pref_loss"))

RULES = {
    "memorisation": (f"held-out loss at its last logged point above its minimum by more than "
                     f"{MEMORISE_RISE:.0%} of the minimum while the training loss at the last logged point is "
                     "below its value at the minimum's step"),
    "preference_at_chance": (f"preference accuracy not above 0.5 + {CHANCE_Z} sqrt(0.25 / n) for n pairs (the "
                             "upper edge of the 95% binomial band around chance), or mean reward margin <= 0; "
                             "held-out: the last eval/pref_accuracy over the recorded held-out pairs; training: "
                             f"pref/accuracy pooled over the last {TRAIN_ROWS} logged rows"),
    "non_finite": "a logged value or a snapshot tensor is NaN or infinite",
}


TITLES = {"memorisation": "memorisation", "preference_at_chance": "preference at chance", "non_finite": "non-finite"}


@dataclass(frozen=True)
class HealthWarning:
    check: str  # a key of RULES
    phase: str
    message: str  # one paragraph with the numbers
    values: dict = field(default_factory=dict)  # the numbers behind the message (health.json)


@dataclass(frozen=True)
class HealthNote:
    """A check that could not run on a phase, and why (shown under the warnings)."""

    check: str
    phase: str
    message: str


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row holding a finite ``key``."""
    return [(int(r["step"]), float(r[key])) for r in rows if is_finite(r.get(key))]


def _value_at(points: list[tuple[int, float]], step: int) -> float | None:
    """The last value logged at or before ``step`` (the first one when none is)."""
    before = [v for s, v in points if s <= step]
    return before[-1] if before else (points[0][1] if points else None)


def _thin(points: list[tuple[int, float]], n: int = SERIES_POINTS) -> list[tuple[int, float]]:
    """At most ``n`` points, evenly spaced, first and last kept."""
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def _num(value: float) -> str:
    return f"{value:.3g}"


def memorisation(rows: list[dict], phase: str, train_key: str, eval_key: str
                 ) -> tuple[list[HealthWarning], list[HealthNote]]:
    """The memorisation rule (module docstring) on one (training loss, held-out loss) pair of keys."""
    evals, trains = series(rows, eval_key), series(rows, train_key)
    if not evals and not trains:
        return [], []
    if not evals:
        return [], [HealthNote("memorisation", phase, f"no {eval_key} logged (held-out evaluation off): not checked")]
    if len(evals) < 2:
        return [], [HealthNote("memorisation", phase,
                               f"{eval_key} logged at {len(evals)} point(s); the check needs two or more "
                               "(set eval_every below the phase's steps)")]
    if not trains:
        return [], [HealthNote("memorisation", phase, f"{eval_key} logged, but no {train_key} to compare with")]
    min_step, min_val = min(evals, key=lambda p: p[1])
    last_step, last_val = evals[-1]
    rise = last_val - min_val
    train_at_min, train_last = _value_at(trains, min_step), trains[-1][1]
    if not (rise > MEMORISE_RISE * abs(min_val) and train_last < train_at_min):
        return [], []
    shown = _thin([p for p in evals if p[0] >= min_step])
    message = (f"{eval_key} rose from its minimum {_num(min_val)} (step {min_step}) to {_num(last_val)} at step "
               f"{last_step} (+{rise / abs(min_val):.1%} of the minimum; the rule allows {MEMORISE_RISE:.0%}) while "
               f"{train_key} fell from {_num(train_at_min)} to {_num(train_last)}: the model fits its training "
               f"data and loses held-out data (memorisation). {eval_key}: "
               + ", ".join(f"step {s}: {_num(v)}" for s, v in shown)
               + f"; {train_key} at the same steps: "
               + ", ".join(_num(_value_at(trains, s)) for s, _ in shown) + ".")
    values = {"eval_key": eval_key, "train_key": train_key, "eval_min": min_val, "eval_min_step": min_step,
              "eval_last": last_val, "eval_last_step": last_step, "train_at_eval_min": train_at_min,
              "train_last": train_last, "eval_series": [list(p) for p in shown],
              "train_series": [[s, _value_at(trains, s)] for s, _ in shown]}
    return [HealthWarning("memorisation", phase, message, values)], []


def chance_band(n: int) -> float:
    """Half-width of the two-sided 95% band of a fair coin's success rate over ``n`` trials."""
    return CHANCE_Z * math.sqrt(0.25 / n)


def _chance_reasons(where: str, acc: float, n: int | None, margin: float | None, how: str) -> tuple[list[str], dict]:
    """Why ``acc`` (over ``n`` pairs) and ``margin`` count as chance, as sentences (none: not at chance)."""
    reasons = []
    values: dict = {"accuracy": acc, "n_pairs": n, "margin": margin, "how": how}
    if n:
        upper = 0.5 + chance_band(n)
        values["chance_upper"] = upper
        if acc <= upper:
            reasons.append(f"{where} accuracy {_num(acc)} over {n} pairs ({how}) is not above the chance band's "
                           f"upper edge {_num(upper)} = 0.5 + {CHANCE_Z} sqrt(0.25 / {n})")
    if margin is not None and margin <= 0:
        reasons.append(f"{where} mean reward margin {_num(margin)} ({how}) is not above 0")
    return reasons, values


def preference_at_chance(rows: list[dict], phase: str, pairs_per_step: int | None, n_eval_pairs: int | None,
                         grade: float | None = None) -> tuple[list[HealthWarning], list[HealthNote]]:
    """The preference-at-chance rule (module docstring) on one alignment phase's rows: one warning
    per phase, naming every reason (training and held-out) with its numbers."""
    reasons, values, notes = [], {}, []
    trained = [r for r in rows if is_finite(r.get("pref/accuracy"))][-TRAIN_ROWS:]
    if trained:
        margins = [r["pref/margin"] for r in trained if is_finite(r.get("pref/margin"))]
        found, values["training"] = _chance_reasons(
            "training", sum(r["pref/accuracy"] for r in trained) / len(trained),
            len(trained) * pairs_per_step if pairs_per_step else None,
            sum(margins) / len(margins) if margins else None,
            "pooled over the logged steps " + ", ".join(str(r["step"]) for r in trained))
        reasons += found
        if not pairs_per_step:
            notes.append(HealthNote("preference_at_chance", phase, "pairs per step unknown (align.train.batch_size "
                                    "missing from config.yaml): training accuracy band not applied"))
    held = [r for r in rows if is_finite(r.get("eval/pref_accuracy"))]
    if held:
        last = held[-1]
        margin = last.get("eval/pref_margin")
        found, values["held_out"] = _chance_reasons("held-out", float(last["eval/pref_accuracy"]), n_eval_pairs,
                                                    float(margin) if is_finite(margin) else None,
                                                    f"at step {last['step']}")
        reasons += found
        if not n_eval_pairs:
            notes.append(HealthNote("preference_at_chance", phase, "number of held-out pairs not recorded "
                                    "(run_info.json n_eval_pairs): held-out accuracy band not applied, margin only"))
    elif trained:
        notes.append(HealthNote("preference_at_chance", phase, "no held-out preference metrics logged; judged on "
                                "training accuracy only"))
    if not reasons:
        return [], notes
    if grade == 0.0:
        notes.append(HealthNote("preference_at_chance", phase, "grade 0 trains the chosen completion's likelihood "
                                "only; chance preference accuracy can be its expected outcome"))
    message = ("preference accuracy at chance: " + "; ".join(reasons)
               + ". The alignment phase did not learn to prefer the chosen completions.")
    return [HealthWarning("preference_at_chance", phase, message, values)], notes


def non_finite(rows: list[dict], phase: str) -> list[HealthWarning]:
    """Non-finite logged values (NaN, inf, or ``null`` read back as NaN), training and geometry keys apart."""
    first: dict[str, int] = {}
    for r in rows:
        for key, value in r.items():
            if key not in ("step", "phase") and isinstance(value, float) and not math.isfinite(value):
                first.setdefault(key, int(r["step"]))
    if not first:
        return []
    training = {k: s for k, s in first.items() if keys.family(k) in TRAINING_FAMILIES}
    geometry = {k: s for k, s in first.items() if k not in training}
    parts = []
    for label, found in (("training metrics", training), ("geometry metrics", geometry)):
        if found:
            listed = sorted(found.items(), key=lambda kv: (kv[1], kv[0]))
            parts.append(f"{len(found)} {label} ({', '.join(f'{k} from step {s}' for k, s in listed[:5])}"
                         + (", ..." if len(found) > 5 else "") + ")")
    message = ("non-finite values (NaN or inf) in " + "; ".join(parts) + ". A diverged run: numbers that depend on "
               "them are NOT MEASURED.")
    return [HealthWarning("non_finite", phase, message, {"first_step": {k: first[k] for k in sorted(first)}})]


def snapshot_non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the snapshot tensors holding a NaN or inf (sorted)."""
    return sorted(k for k, t in state.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def snapshot_warning(names: list[str], phase: str, snapshot: str) -> list[HealthWarning]:
    if not names:
        return []
    return [HealthWarning("non_finite", phase, f"snapshot {snapshot} holds non-finite values in {len(names)} "
                          f"tensor(s) ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); spectra and "
                          "k-curves skip them.", {"snapshot": snapshot, "tensors": names})]


def check_phase(rows: list[dict], phase: str, *, alignment: bool, pairs_per_step: int | None = None,
                n_eval_pairs: int | None = None, grade: float | None = None
                ) -> tuple[list[HealthWarning], list[HealthNote]]:
    """Every row check on one phase: non-finite values, memorisation, and (alignment) preference at chance."""
    warnings, notes = list(non_finite(rows, phase)), []
    for train_key, eval_key in LOSS_PAIRS:
        w, n = memorisation(rows, phase, train_key, eval_key)
        warnings += w
        notes += n
    if alignment:
        w, n = preference_at_chance(rows, phase, pairs_per_step, n_eval_pairs, grade)
        warnings += w
        notes += n
    return warnings, notes


def health_block(warnings: list[HealthWarning], notes: list[HealthNote]) -> list[str]:
    """Markdown lines of the report's health section (placed at the top)."""
    title = f"## Health: {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else \
        "## Health: no warnings"
    lines = [title, ""]
    for w in warnings:
        lines += [f"> **WARNING ({TITLES[w.check]}, {w.phase})**: {w.message}", ">"]
    if warnings:
        lines[-1] = ""
    grouped: dict[tuple[str, str], list[str]] = {}  # the same note on several phases is printed once
    for n in notes:
        grouped.setdefault((n.check, n.message), []).append(n.phase)
    for (check, message), phases in grouped.items():
        lines.append(f"- note ({TITLES[check]}; {', '.join(phases)}): {message}")
    if notes:
        lines.append("")
    lines += ["Rules: " + "; ".join(f"**{TITLES[name]}** = {rule}" for name, rule in RULES.items()) + ".",
              ""]
    return lines


def health_json(warnings: list[HealthWarning], notes: list[HealthNote]) -> str:
    """``health.json``: the rules, the warnings with their numbers, and the notes (non-finite as null)."""
    return json.dumps({"rules": RULES, "warnings": [json_safe(asdict(w)) for w in warnings],
                       "notes": [asdict(n) for n in notes]}, indent=2)


def console_lines(report_dir: Path) -> list[str]:
    """One line per warning of ``report_dir/health.json`` for the end of a run's console output
    (the numbers stay in the report); none when the report has no health file or no warnings."""
    path = Path(report_dir) / "health.json"
    if not path.is_file():
        return []
    warnings = json.loads(path.read_text())["warnings"]
    lines = [f"WARNING ({TITLES[w['check']]}, {w['phase']}): {w['message'].split('. ')[0].rstrip('.')}."
             for w in warnings]
    if lines:
        lines.append(f"details: {Path(report_dir) / 'report.md'} (Health)")
    return lines
