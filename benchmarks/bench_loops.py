"""Step time of our graded preference loop against TRL's DPOTrainer: same model, pairs and batches.

One optimizer step (``--batch`` pairs x ``--grad-accum`` micro-batches, AdamW, clipping, schedule) of

    ours          what ``trainers/preference.py``'s ``align`` does per step: each micro-batch's chosen and
                  rejected through ``trainers/pairs.py``'s ``pair_logps``, the graded loss against
                  precomputed reference log-probs, backward; then the step's one host read (gradient
                  norm, loss and statistics finite), optimizer, schedule, the logged row's read-back
    TRL           ``trl.DPOTrainer`` driven by ``weightgeom.trainers.trl_dpo.run_trl_dpo`` (sigmoid DPO; a
                  reference forward per micro-batch, as TRL does by default), timed from the end of its
                  previous step to its ``on_step_end`` (log row, batch collation, forwards, backward, step)

each plain and with the instruments (``InstrumentSuite`` with the default ``SuiteConfig`` roles and
sides, as ``TrainingSession`` builds it; for TRL the ``WeightGeomCallback``), statistics on every step,
the metric schedule off (``every_n`` huge: a scheduled metric computation is timed by
benchmarks/bench_instruments.py). Our pair log-probs run through these paths (``--paths``):

    old   the code before this change: every row at the width of the whole tokenized set, logits
          over every position, ``gather - logsumexp``
    a     (a) only: each batch cut to its own longest row
    ab    (a) + (b): also logits for the positions that predict a completion token only (``logits_to_keep``)
    new   ``pair_logps`` as it is: (a) + (b) + the same ``gather - logsumexp`` with a one-buffer backward
          (``trainers/losses.py``'s ``TokenLogps``)

Both loops see the same batches: pairs from the embedded stdlib corpus (``build_embedded_preferences``:
200-character prompts, completions of whole lines within 120 characters), step k's pairs drawn by
``batch_indices`` as ``align`` draws them, and handed to TRL in that order (``train_sampling_strategy
="sequential"``, prompts fitted by ``fit_prompts`` as ``align_with_trl`` does). Variants are timed in
rotations: rounds of one step each, the order rotating every round (ABAB for two); medians over the
timed rounds. Our variants of a rotation share one model, its optimizer and suite (attached for an
instrumented step, detached for a plain one). Each TRL trainer has its own model (and reference copy)
and runs in its own thread, stopped at every step's end until its next turn: one variant runs at a time.

Four rotations run one after the other (``--rotations``), each small enough that a 135M-parameter
model's copies (AdamW state, TRL's reference, the instruments' weight views, the old path's logits)
fit beside other jobs on a 23 GB machine: ``paths`` (our paths), ``trl`` (our new path, TRL),
``ours-instr`` (our new path plain, our ``--instr-paths`` instrumented) and ``trl-instr`` (TRL plain and
instrumented, one reference copy shared). A ratio of variants from two rotations is the product of
within-rotation ratios through the variants they share (``ours new``, ``TRL``), and is marked so.

    python benchmarks/bench_loops.py                                   # the tiny embedded-style model
    python benchmarks/bench_loops.py --model /path/to/SmolLM2-135M --steps 5 --warmup 1 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from bench_instruments import torch_device

from weightgeom.core.config import ModelConfig, TokenizerConfig, TrainConfig
from weightgeom.core.data import batch_indices, build_embedded_preferences, load_texts, tokenize_pairs
from weightgeom.core.models import build_model, load_local_model
from weightgeom.core.tokenizer import load_tokenizer, tokenizer_from_config
from weightgeom.hooks.suite import InstrumentSuite, SuiteConfig
from weightgeom.trainers.callback import WeightGeomCallback
from weightgeom.trainers.losses import GradedLoss, host_floats
from weightgeom.trainers.optim import make_optimizer, make_scheduler
from weightgeom.trainers.pairs import batch_window, completion_logits, pair_logps
from weightgeom.trainers.trl_dpo import fit_prompts, run_trl_dpo, trainer_settings

ROTATIONS = ("paths", "trl", "ours-instr", "trl-instr")
QUIET_SUITE = dict(every_n=10**9, log_spaced=False)  # statistics every step, no metric compute inside a step


# ----- the paths of our pair log-probs ------------------------------------------------------------
def _rows(data: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.cat([data[f"chosen_{k}"][idx], data[f"rejected_{k}"][idx]])
                 for k in ("input_ids", "attention_mask", "loss_mask"))


def _gather_lse(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor):
    """``sequence_logps`` before this change: ``gather - logsumexp`` of the shifted logits."""
    logits = logits[:, :-1].float()
    token = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    mask = loss_mask[:, 1:].bool()
    return token.masked_fill(~mask, 0.0).sum(-1), mask.sum(-1)


def _split(logps, counts, b):
    return logps[:b], logps[b:], counts[:b]


def path_old(model, data, idx, device):
    """``pair_logps`` before this change: the whole set's width, logits over every position."""
    ids, mask, loss_mask = (t.to(device) for t in _rows(data, idx))
    logits = model(input_ids=ids, attention_mask=mask).logits
    return _split(*_gather_lse(logits.float(), ids, loss_mask), len(idx))


def _cut(model, data, idx, device, completions_only: bool):
    """Rows cut to the batch's longest row; logits at every position, or (``completions_only``) only at
    those that predict a completion token; autograd's ``gather - logsumexp``."""
    ids, mask, loss_mask = _rows(data, idx)
    width, keep = batch_window(mask, loss_mask)
    keep = keep if completions_only else width
    ids, mask, loss_mask = (t[:, :width].to(device) for t in (ids, mask, loss_mask))
    logits = completion_logits(model, ids, mask, keep)
    return _split(*_gather_lse(logits.float(), ids[:, width - keep:], loss_mask[:, width - keep:]), len(idx))


def path_a(model, data, idx, device):
    """(a): cut to the batch's longest row, logits over every position."""
    return _cut(model, data, idx, device, completions_only=False)


def path_ab(model, data, idx, device):
    """(a) + (b): also logits for the predicting positions only, still autograd's ``gather - logsumexp``."""
    return _cut(model, data, idx, device, completions_only=True)


PATHS: dict[str, Callable] = {"old": path_old, "a": path_a, "ab": path_ab, "new": pair_logps}


# ----- our loop ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Setup:
    make_model: Callable[[], torch.nn.Module]  # the initial weights, a fresh copy on every call
    tokenizer: object
    pairs: list[dict]
    data: dict
    ref: tuple[torch.Tensor, torch.Tensor]  # reference log-probs of every pair used (zeros elsewhere)
    train: TrainConfig
    device: torch.device
    grade: float
    beta: float
    seed: int
    rounds: int
    max_len: int


class OurLoop:
    """One model, its optimizer and schedule, and (``instruments``) the suite: the state ``align`` steps.
    Plain and instrumented steps share the model: the suite is attached (as ``TrainingSession`` attaches
    it: hooks on the model, the update instrument on the optimizer) for an instrumented step and
    detached for a plain one, outside the timed region. Its statistics then hold the instrumented steps."""

    def __init__(self, s: Setup, instruments: bool) -> None:
        self.s = s
        self.model = s.make_model().to(s.device).train()
        self.opt = make_optimizer(self.model.parameters(), s.train)
        self.sched = make_scheduler(self.opt, s.train)
        self.suite = InstrumentSuite(self.model, SuiteConfig(**QUIET_SUITE), seed=s.seed) if instruments else None
        self.attached = False
        self.loss_fn = GradedLoss(s.grade, s.beta)
        self.steps = 0

    def step(self, round_: int, path: Callable, instruments: bool) -> float:
        s, t = self.s, self.s.train
        if instruments != self.attached:
            self.suite.attach(self.model, self.opt) if instruments else self.suite.detach()
            self.attached = instruments
        suite = self.suite if instruments else None
        sync(s.device)
        start = time.perf_counter()
        idx = batch_indices(len(s.pairs), t.batch_size * t.grad_accum, round_, s.seed)
        if suite is not None:
            suite.set_loss_normalizer(len(idx))
        metrics: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), dtype=torch.bool, device=s.device)
        for micro in idx.chunk(t.grad_accum):
            c, r, n = path(self.model, s.data, micro, s.device)
            out = self.loss_fn(c, r, s.ref[0][micro].to(s.device), s.ref[1][micro].to(s.device), n)
            loss = out.loss * len(micro) / len(idx)
            bad = bad | ~torch.isfinite(loss.detach())
            loss.backward()
            for k, v in out.values.items():
                metrics[k] = metrics.get(k, 0.0) + v.double() * len(micro) / len(idx)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm or float("inf"))
        finite = suite.statistics_finite() if suite is not None else None
        flags = [bad.double().reshape(1)] + ([(~finite).double().reshape(1)] if finite is not None else [])
        torch.cat([grad_norm.detach().double().reshape(1), *flags]).tolist()  # the step's one host read
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if suite is not None:
            suite.after_optimizer_step(self.steps)
        host_floats(metrics)  # a logged row (log_every 1, as TRL here)
        sync(s.device)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.attached:
            self.suite.detach()


@dataclass
class Variant:
    name: str
    step: Callable[[int], float]
    times: list[float] = field(default_factory=list)
    widths: list[int] | None = None  # TRL's micro-batch widths

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# ----- TRL, one step per turn ------------------------------------------------------------------------
class _NullSink:
    def log(self, row, step) -> None: ...

    def close(self) -> None: ...


class TrlRunner:
    """``run_trl_dpo`` in a thread that stops at the end of every step until :meth:`step` gives it the
    next turn; :meth:`step` returns the seconds of that step."""

    class _Turns(TrainerCallback):
        def __init__(self, runner: TrlRunner) -> None:
            self.r = runner

        def on_train_begin(self, args, state, control, **kwargs):
            self.r.wait_turn()

        def on_step_end(self, args, state, control, **kwargs):
            sync(self.r.device)
            self.r.times.append(time.perf_counter() - self.r.t0)
            self.r.wait_turn()
            if self.r.stopping:  # closed: no further step (nor the suite's forced compute at max_steps)
                control.should_training_stop = True
            return control

    def __init__(self, s: Setup, instruments: bool, out_dir: Path, ref_model: torch.nn.Module) -> None:
        self.device, self.times, self.error, self.stopping = s.device, [], None, False
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.t0 = 0.0
        per_step = s.train.batch_size * s.train.grad_accum
        order = [i for k in range(s.rounds + 1) for i in batch_indices(len(s.pairs), per_step, k, s.seed).tolist()]
        fitted = fit_prompts(s.pairs, s.tokenizer, s.max_len)
        pairs = [fitted[i] for i in order]  # one step more than timed: it never runs (see close)
        callbacks = [WeightGeomCallback(SuiteConfig(**QUIET_SUITE), sink=_NullSink(), summary=False, seed=s.seed)
                     ] if instruments else []
        callbacks.append(self._Turns(self))
        t = dataclasses.replace(s.train, steps=s.rounds + 1)
        extra = {**trainer_settings(t, progress=False), "logging_steps": 1, "train_sampling_strategy": "sequential"}
        model = s.make_model().train()
        self.widths: list[int] = []  # of the policy's forwards (TRL pads each batch to its longest row)
        model.register_forward_pre_hook(
            lambda m, a, kw: self.widths.append(kw["input_ids"].shape[1]) if torch.is_grad_enabled() else None,
            with_kwargs=True)
        kwargs = dict(ref_model=ref_model, steps=t.steps, lr=t.lr, beta=s.beta, batch_size=t.batch_size,
                      grad_accum=t.grad_accum, max_length=s.max_len, seed=s.seed, callbacks=callbacks,
                      extra_args=extra)
        self.thread = threading.Thread(target=self._run, args=(model, s.tokenizer, pairs, out_dir, kwargs),
                                       daemon=True)
        self.thread.start()
        self.done.acquire()  # built, tokenized, waiting in on_train_begin
        self._check()

    def _run(self, model, tokenizer, pairs, out_dir, kwargs) -> None:
        try:
            run_trl_dpo(model, tokenizer, pairs, out_dir, **kwargs)
        except BaseException as err:  # noqa: BLE001  (handed to the main thread)
            self.error = err
        finally:
            self.done.release()

    def wait_turn(self) -> None:
        if self.stopping:
            return
        self.done.release()
        self.go.acquire()
        self.t0 = time.perf_counter()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError("TRL's trainer failed") from self.error

    def step(self) -> float:
        self.go.release()
        self.done.acquire()
        self._check()
        return self.times[-1]

    def close(self) -> None:
        """Let the trainer stop after the step it waits in (its max_steps is one more, so the suite's
        forced compute at max_steps never runs inside a timed step)."""
        self.stopping = True
        self.go.release()
        self.thread.join()


# ----- groups -------------------------------------------------------------------------------------
def run_group(title: str, names: list[str], s: Setup, warmup: int, out_dir: Path) -> dict[str, float]:
    """Build the variants ``names`` (``ours <path>[ +instr]``, ``TRL[ +instr]``), time them in rounds
    with the order rotating, print the table; returns the medians."""
    loop: OurLoop | None = None  # every path, plain and instrumented, on one model
    runners: list[TrlRunner] = []
    ref_model = None  # TRL's frozen reference, shared by the rotation's trainers (read-only, one runs at a time)
    variants: list[Variant] = []
    try:
        ours = [n for n in names if n.startswith("ours")]
        if ours:
            loop = OurLoop(s, instruments=any(n.endswith("+instr") for n in ours))
        for name in names:
            instruments = name.endswith("+instr")
            if name.startswith("TRL"):
                if ref_model is None:  # what run_trl_dpo's frozen_copy makes, without a second copy
                    ref_model = s.make_model().to(s.device).eval().requires_grad_(False)
                runner = TrlRunner(s, instruments, out_dir / name.replace(" ", "_").replace("+", ""), ref_model)
                runners.append(runner)
                variants.append(Variant(name, lambda r, runner=runner: runner.step(), widths=runner.widths))
            else:
                path = PATHS[name.split()[1]]
                variants.append(Variant(name, lambda r, loop=loop, path=path, i=instruments: loop.step(r, path, i)))
        for r in range(s.rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                dt = v.step(r)
                if r >= warmup:
                    v.times.append(dt)
                print(f"  [{title}] round {r + 1}/{s.rounds} {v.name}: {dt:.2f} s", flush=True)
    finally:
        if loop is not None:
            loop.close()
        for runner in runners:
            runner.close()
    print(f"\n{title}: seconds per optimizer step, median (min-max) of {s.rounds - warmup} rounds")
    for v in variants:
        extra = f"   micro-batch width median {statistics.median(v.widths)}" if v.widths else ""
        print(f"  {v.name:<22} {v.median:8.2f}  ({min(v.times):.2f}-{max(v.times):.2f}){extra}")
    medians = {v.name: v.median for v in variants}
    del loop, runners, variants, ref_model
    release_memory(s.device)
    return medians


def release_memory(device: torch.device) -> None:
    """Free what the last rotation held, also to the OS (glibc keeps freed heap pages otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----- setup --------------------------------------------------------------------------------------
def load(args) -> tuple[Callable[[], torch.nn.Module], object, str]:
    """(model factory, tokenizer, label). Every variant gets its own copy, loaded (or built, seeded) anew:
    the same weights, and no master copy held in memory."""
    if args.model:
        tokenizer = load_tokenizer(str(args.model), 0, Path(tempfile.gettempdir()))  # pad = eos where absent
        return (lambda: load_local_model(args.model)), tokenizer, Path(args.model).name
    tokenizer = tokenizer_from_config(TokenizerConfig())
    cfg = ModelConfig()
    return ((lambda: build_model(cfg, len(tokenizer), args.seed)), tokenizer,
            f"tiny {cfg.arch} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, embedded BPE vocab {len(tokenizer)})")


def reference(model, data: dict, used: torch.Tensor, batch: int, device, path: Callable) -> tuple:
    """Log-probs of the pairs ``used`` under ``model`` (eval mode, no grad), in (n_pairs,) float64 tensors."""
    n = len(data["chosen_input_ids"])
    chosen, rejected = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    was = model.training
    model.eval()
    with torch.no_grad():
        for idx in used.split(batch):
            c, r, _ = path(model, data, idx, device)
            chosen[idx], rejected[idx] = c.double().cpu(), r.double().cpu()
    model.train(was)
    return chosen, rejected


def time_reference(model, data: dict, pairs: torch.Tensor, batch: int, device) -> dict[str, float]:
    """Seconds of a reference pass (``reference_logps``'s work: eval mode, no grad) over ``pairs`` with the
    old and the new path, batch by batch alternating, the order flipping every batch."""
    total = {"old": 0.0, "new": 0.0}
    was = model.training
    model.eval()
    with torch.no_grad():
        for i, idx in enumerate(pairs.split(batch)):
            for k in ("old", "new") if i % 2 == 0 else ("new", "old"):
                sync(device)
                start = time.perf_counter()
                PATHS[k](model, data, idx, device)
                sync(device)
                total[k] += time.perf_counter() - start
    model.train(was)
    return total


def prepare(args, device: torch.device) -> Setup:
    """The model factory, pairs, their reference log-probs and the step settings every rotation shares;
    prints the setup, the old and new paths' log-prob differences and the reference pass's time."""
    make_model, tokenizer, label = load(args)
    pairs = build_embedded_preferences(load_texts("stdlib"), args.pairs, seed=args.seed)
    data = tokenize_pairs(pairs, tokenizer, args.max_len)
    rounds = args.warmup + args.steps
    train = TrainConfig(steps=rounds + 1, batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr,
                        warmup_steps=1, log_every=1)
    per_step = args.batch * args.grad_accum
    used = torch.cat([batch_indices(len(pairs), per_step, k, args.seed) for k in range(rounds)]).unique()
    model = make_model().to(device)

    # the old and new paths' log-probs of the same pairs (fp32, eval mode), and a float64 copy's (new path)
    check = used[: args.check_pairs]
    old, new = (reference(model, data, check, args.batch, device, PATHS[k]) for k in ("old", "new"))
    exact = reference(make_model().double().to(device), data, check, args.batch, device, pair_logps)

    def diff(x, y) -> float:
        return max(float((a[check] - b[check]).abs().max()) for a, b in zip(x, y))

    scale = float(torch.cat([exact[0][check], exact[1][check]]).abs().max())
    ref_s = time_reference(model, data, check, args.batch, device)
    ref = tuple(t.float() for t in reference(model, data, used, args.batch, device, pair_logps))
    s = Setup(make_model, tokenizer, pairs, data, ref, train, device, args.grade, args.beta, args.seed, rounds,
              args.max_len)
    windows = [batch_window(*_rows(data, micro)[1:]) for k in range(rounds)
               for micro in batch_indices(len(pairs), per_step, k, args.seed).chunk(args.grad_accum)]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    import trl  # noqa: PLC0415

    print(f"torch {torch.__version__}, trl {trl.__version__}, {where}; model {label}, {params:.1f}M params, fp32")
    print(f"{len(pairs)} embedded pairs, max_len {args.max_len}: set width {data['chosen_input_ids'].shape[1]}; "
          f"the timed micro-batches' own widths: median {statistics.median(w for w, _ in windows)} "
          f"(min {min(w for w, _ in windows)}, max {max(w for w, _ in windows)}), positions with logits: median "
          f"{statistics.median(k for _, k in windows)}")
    print(f"batch {args.batch} pairs x grad_accum {args.grad_accum}, AdamW lr {args.lr}, graded g={args.grade} "
          f"beta={args.beta} (TRL: sigmoid DPO); {args.warmup} warmup + {args.steps} timed rounds")
    print(f"summed log-probs of {len(check)} pairs x chosen/rejected (eval, fp32): max |old - new| "
          f"{diff(old, new):.3g}; against the float64 model: old {diff(old, exact):.3g}, new {diff(new, exact):.3g} "
          f"(largest |logp| {scale:.1f})")
    print(f"reference pass (no grad, batches of {args.batch}, old and new alternating), the same {len(check)} pairs: "
          f"old {ref_s['old']:.2f} s, new {ref_s['new']:.2f} s, old / new {ref_s['old'] / ref_s['new']:.3f}x\n")
    del model
    release_memory(device)
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local HF model directory (default: the tiny embedded-style model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--pairs", type=int, default=512, help="pairs tokenized (the set whose width the old path pads to)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--paths", default="old,new", help="our paths in the 'paths' rotation: old, a, ab, new")
    p.add_argument("--instr-paths", default="new", help="our paths in the 'ours instrumented' rotation")
    p.add_argument("--rotations", default=",".join(ROTATIONS),
                   help=f"which rotations to run, of {','.join(ROTATIONS)} (see the module docstring)")
    p.add_argument("--grade", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--check-pairs", type=int, default=16,
                   help="pairs whose log-probs the old and new paths compare, and whose reference pass is timed")
    args = p.parse_args(argv)
    device = torch_device(p, args)
    paths = list(dict.fromkeys(args.paths.split(",") + ["new"]))  # every ratio is against the new path
    instr_paths = list(dict.fromkeys(args.instr_paths.split(",") + ["new"]))
    chosen = args.rotations.split(",")
    if unknown := set(paths + instr_paths) - set(PATHS):
        p.error(f"unknown paths {sorted(unknown)}; choose from {list(PATHS)}")
    if unknown := set(chosen) - set(ROTATIONS):
        p.error(f"unknown --rotations {sorted(unknown)}; choose from {list(ROTATIONS)}")

    s = prepare(args, device)

    rotations = {
        "paths": [f"ours {k}" for k in paths],
        "trl": ["ours new", "TRL"],
        "ours-instr": ["ours new"] + [f"ours {k} +instr" for k in instr_paths],
        "trl-instr": ["TRL", "TRL +instr"],
    }
    with tempfile.TemporaryDirectory() as out:
        medians = {name: run_group(name, rotations[name], s, args.warmup, Path(out)) for name in chosen}

    print("\nratios of medians (within one rotation, else chained through variants two rotations share):")
    wanted = [(f"ours {k}", "ours new") for k in paths if k != "new"] + [(f"ours {k}", "TRL") for k in paths]
    wanted += [(f"ours {k} +instr", f"ours {k}") for k in instr_paths]
    wanted += [(f"ours {k} +instr", "ours new +instr") for k in instr_paths if k != "new"]
    wanted += [("TRL +instr", "TRL")] + [(f"ours {k} +instr", "TRL +instr") for k in instr_paths]
    present = {name for m in medians.values() for name in m}
    for num, den in [(n, d) for n, d in wanted if n in present and d in present]:
        value, how = ratio(medians, num, den)
        print(f"  {num + ' / ' + den:<40} {value:6.3f}x{how}")


def ratio(medians: dict[str, dict[str, float]], num: str, den: str) -> tuple[float, str]:
    """``num / den`` from the rotation that ran both, else a product of within-rotation ratios through
    variants that two rotations share (``num / x`` in one, ``x / den`` in the next, ...)."""
    queue = [(title, num, 1.0, f"{title!r}") for title, m in medians.items() if num in m]
    seen = {title for title, _, _, _ in queue}
    while queue:
        title, at, value, how = queue.pop(0)
        m = medians[title]
        if den in m:
            return value * m[at] / m[den], "" if at == num else f"   (chained: {how})"
        for other, mo in medians.items():
            shared = next((v for v in m if v in mo), None)
            if other not in seen and shared is not None:
                seen.add(other)
                queue.append((other, shared, value * m[at] / m[shared], f"{how} x {other!r} via {shared!r}"))
    return float("nan"), "   (no chain)"

if __name__ == "__main__":
    main()
