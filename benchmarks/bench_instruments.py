"""Cost of full-rate instruments: one training step with vs without ``InstrumentSuite`` attached.

A step is forward + backward + AdamW step on a batch of random tokens (fp32, no padding, as the
CE pretraining loop feeds packed blocks). The instrumented model carries the default roles
(``hooks.suite.SuiteConfig``): ``C_a`` per input group, ``C_delta`` for the write roles and
the optimizer-side update instrument, accumulated on *every* step (``every_n`` huge, so the
scheduled metric compute never fires inside the timed steps). The metric compute is timed on its
own afterwards and reported as ms per compute.

Plain and instrumented steps alternate (ABAB...) on two identically initialised copies of the
model, so drift in machine load hits both sides alike; the table reports medians.

    python benchmarks/bench_instruments.py                 # hidden 128 and 256, torch's threads
    python benchmarks/bench_instruments.py --steps 40 --sizes 128 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from core.models import build_tiny_model  # noqa: E402
from hooks.suite import InstrumentSuite, SuiteConfig  # noqa: E402

VOCAB, LAYERS, HEADS, SEQ, BATCH = 4096, 4, 4, 128, 16


def make_model(hidden: int) -> torch.nn.Module:
    return build_tiny_model("llama", vocab_size=VOCAB, hidden_size=hidden, num_layers=LAYERS,
                            num_heads=HEADS, max_position_embeddings=256, seed=0)


def make_suite(model: torch.nn.Module, cfg: SuiteConfig) -> InstrumentSuite:
    # every_n = 10**9: statistics on every step, metrics never due during the timed loop.
    return InstrumentSuite(model, cfg, every_n=10**9, log_spaced=False, seed=0)


def train_step(model, optimizer, ids: torch.Tensor, suite: InstrumentSuite | None, step: int) -> tuple[float, float]:
    """One optimizer step as trainers/ce.py does it (token-sum loss / predicted tokens).
    Returns (wall seconds, process CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    n_predicted = ids[:, 1:].numel()
    if suite is not None:
        suite.set_loss_normalizer(n_predicted)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")
    (loss / n_predicted).backward()
    optimizer.step()  # the update instrument's optimizer hooks run here
    optimizer.zero_grad(set_to_none=True)
    if suite is not None:
        suite.after_optimizer_step(step)
    return time.perf_counter() - start, time.process_time() - cpu


def bench_size(hidden: int, cfg: SuiteConfig, steps: int, warmup: int, computes: int) -> dict:
    plain, inst = make_model(hidden), make_model(hidden)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt_inst = torch.optim.AdamW(inst.parameters(), lr=1e-3)
    suite = make_suite(inst, cfg)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "inst": []}
    with suite.attached(inst, opt_inst):
        for i in range(warmup + steps):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
            # Alternate which side goes first so neither always runs on a cache warmed by the other.
            order = [("plain", plain, opt_plain, None), ("inst", inst, opt_inst, suite)]
            for name, model, opt, s in order if i % 2 == 0 else order[::-1]:
                dt = train_step(model, opt, ids, s, i + 1)
                if i >= warmup:
                    times[name].append(dt)
        compute_ms = []
        for _ in range(max(1, computes)):
            start = time.perf_counter()
            metrics = suite.compute(warmup + steps)
            compute_ms.append(1e3 * (time.perf_counter() - start))

    def median_ms(name: str, clock: int) -> float:
        return 1e3 * statistics.median(t[clock] for t in times[name])

    plain_ms, inst_ms = median_ms("plain", 0), median_ms("inst", 0)
    return {"hidden": hidden, "params_M": sum(p.numel() for p in plain.parameters()) / 1e6,
            "plain_ms": plain_ms, "inst_ms": inst_ms, "ratio": inst_ms / plain_ms,
            "cpu_ratio": median_ms("inst", 1) / median_ms("plain", 1),
            "compute_ms": statistics.median(compute_ms), "n_metrics": len(metrics),
            "groups": len(suite.cov.group_keys), "outputs": len(suite.cov.output_keys),
            "matrices": len(suite.tracked), "dims": _dims(suite)}


def _dims(suite: InstrumentSuite) -> str:
    """Width of each layer-0 covariance, e.g. ``C_a attn_in 128 ... | C_delta o 128 ...``."""
    order = ["attn_in", "o_in", "mlp_in", "down_in", "q", "k", "v", "o", "gate", "up", "down"]
    state = suite.cov.state_dict()
    side: dict[str, list[tuple[str, int]]] = {"cov_in": [], "cov_out": []}
    for name, value in state.items():
        parts = name.split("/")
        if parts[1] == "L0" and parts[-1] == "sum_outer":
            side[parts[0]].append((parts[2], value.shape[0]))
    side = {k: [f"{name} {dim}" for name, dim in sorted(v, key=lambda x: order.index(x[0]))] for k, v in side.items()}
    return f"C_a {', '.join(side['cov_in'])} | C_delta {', '.join(side['cov_out'])} (per layer)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after warmup)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    p.add_argument("--sizes", default="128,256", help="comma-separated hidden sizes (128 = default tiny model)")
    p.add_argument("--computes", type=int, default=3, help="metric computations to time (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--input-roles", default=None,
                   help="comma-separated roles with C_a (default: the config's; all: q,k,v,o,gate,up,down)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="instruments.max_tokens (token subsample per forward; default: every token, exact)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SuiteConfig(max_tokens=args.max_tokens)
    if args.input_roles:
        cfg.input_roles = args.input_roles.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; llama, {LAYERS} layers, {HEADS} heads, "
          f"vocab {VOCAB}, batch {BATCH} x seq {SEQ}, fp32, AdamW; {args.warmup} warmup + {args.steps} timed steps")
    print(f"instruments (SuiteConfig defaults, statistics every step): roles={cfg.roles} input_roles={cfg.input_roles} "
          f"output_roles={cfg.output_roles} k={cfg.k} zscores={cfg.zscores} max_tokens={cfg.max_tokens} "
          f"dtype={cfg.dtype}; C_a per input group, C_delta per output role, update instrument on the optimizer")
    rows = [bench_size(int(h), cfg, args.steps, args.warmup, args.computes) for h in args.sizes.split(",")]
    print(f"\n{'hidden':>6} {'params':>7} {'tracked':>16} {'plain ms':>9} {'instr ms':>9} {'ratio':>6} "
          f"{'cpu ratio':>9} {'compute ms':>11} {'metrics':>7}")
    for r in rows:
        tracked = f"{r['matrices']}W {r['groups']}Ca {r['outputs']}Cd"
        print(f"{r['hidden']:>6} {r['params_M']:>6.2f}M {tracked:>16} {r['plain_ms']:>9.1f} {r['inst_ms']:>9.1f} "
              f"{r['ratio']:>5.3f}x {r['cpu_ratio']:>8.3f}x {r['compute_ms']:>11.0f} {r['n_metrics']:>7}")
    for r in rows:
        print(f"hidden {r['hidden']}: {r['dims']}")
    print("\nratio = median instrumented step / median plain step, wall clock (target <= 1.10x); cpu ratio = the same "
          "in process CPU time (steadier on a shared machine with --threads 1; with more threads it counts OpenMP "
          "spin-waits); compute = one scheduled metric computation (InstrumentSuite.compute), not in the step times")


if __name__ == "__main__":
    main()
