"""What the instruments cost at the sizes researchers study: memory, checkpoint bytes, metric time.

Every measurement runs in a fresh process (a child of this script), so resident and peak memory are
the process's own: the child builds one model, trains it with AdamW, and reports

    resident    RSS after 2 optimizer steps (freed memory returned to the OS first: malloc_trim)
    peak        the process's high-water RSS over the whole run: 2 steps, a due step (metrics computed),
                the instrument state taken and written as a checkpoint file would be
    state       bytes of ``InstrumentSuite.state_dict()`` (what every checkpoint holds) and of the W0 file
                (written once per phase)
    compute     the metric computations of two scheduled steps (the first cold, the second warm-started)
                and of the phase's last step (full spectra and k-curves): each due step's optimizer step
                with the suite's bookkeeping, less step 2's (which computes nothing); and the wall time of
                the first and second training steps

A child is ``plain`` (no instruments), ``instrumented`` (``InstrumentSuite`` defaults) or
``disk`` (defaults with ``instruments.reference: disk``), on a ``full`` fine-tune or ``lora`` (r=16 on
all seven roles). Shapes: ``smollm2`` (SmolLM2-135M-Instruct, the whole model, from the local GGUF
wheel), ``1b`` (one block at Llama-3.2-1B shape: hidden 2048, MLP 8192, GQA 32/8) and ``8b`` (one block
at Llama-3-8B shape: hidden 4096, MLP 14336, GQA 32/8); block models carry a ``--block-vocab`` unembedding
(the prediction subspace of a whole model's vocabulary is timed on its own, ``--pred``). The tables
give memory in fp32 copies of the tracked weights (the roles' matrices), the unit of the targets.

    python benchmarks/bench_scale.py                                  # every shape, full and LoRA
    python benchmarks/bench_scale.py --shapes 8b --modes full --variants plain,instrumented,disk
    python benchmarks/bench_scale.py --repo /path/to/old/checkout     # the same children on another version
    python benchmarks/bench_scale.py --step-ratio --shapes 1b --tokens 2048   # plain vs instrumented step time
    python benchmarks/bench_scale.py --pred                           # the prediction subspace at real vocabularies
    python benchmarks/bench_scale.py --device cuda --bf16 ...         # on a GPU: bf16 autocast, tf32 Grams

It prints measured numbers and asserts nothing (benchmarks/README.md keeps the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_heads=32, num_kv_heads=8),
          "8b": dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8),
          "tiny": dict(hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2)}  # dry runs
ROLE_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUDA = False  # set from --device in the child


# ----- the child: one model, one variant ---------------------------------------------------------------
def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``); on CUDA
    (``--device cuda``) the allocator's allocated / peak allocated bytes instead."""
    if CUDA:
        import torch  # noqa: PLC0415
        return torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build(args, torch):
    from weightgeom.core.models import build_tiny_model, load_local_model  # noqa: PLC0415

    if args.shape == "smollm2":
        from weightgeom.core.model_sources import resolve_model  # noqa: PLC0415
        model = load_local_model(resolve_model("smollm2-135m-instruct", progress=False)).train()
    else:
        model = build_tiny_model("llama", vocab_size=args.block_vocab, num_layers=1, seed=0,
                                 max_position_embeddings=max(256, args.seq), **SHAPES[args.shape])
    if args.mode == "lora":
        import peft  # noqa: PLC0415
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=ROLE_MODULES))
    return model.to(args.device)


def suite_for(model, args):
    from weightgeom.hooks.suite import InstrumentSuite, SuiteConfig  # noqa: PLC0415

    fields = SuiteConfig.__dataclass_fields__
    options = dict(every_n=10**9, log_spaced=False)
    if "reference" in fields:  # this version has W0 places
        options["reference"] = "disk" if args.variant == "disk" else "device"
    if args.gram_precision != "fp32":
        options["gram_precision"] = args.gram_precision
    kw = {"reference_dir": args.scratch} if "reference_dir" in inspect.signature(InstrumentSuite).parameters else {}
    return InstrumentSuite(model, SuiteConfig(**options), **kw)


def reset_peak() -> None:
    """Start a new high-water mark (Linux: clear_refs 5; CUDA: the allocator's peak)."""
    if CUDA:
        import torch  # noqa: PLC0415
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> dict:
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trim()
    base_rss = rss_bytes()
    model = build(args, torch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    suite = None if args.variant == "plain" else suite_for(model, args)
    announce = suite is not None and "step" in inspect.signature(suite.before_optimizer_step).parameters
    if suite is not None:
        suite.schedule = lambda step: step in (3, 4)  # two scheduled computations, then the last step's
        suite.attach(model, opt)
    vocab = model.config.vocab_size if hasattr(model, "config") else args.block_vocab
    g = torch.Generator().manual_seed(1)
    tracked = sum(getattr(tm.module, "base_layer", tm.module).weight.numel()
                  for tm in (suite.tracked if suite else _tracked(model)))
    times, bookkeeping, peaks = [], [], {}
    for step in (1, 2, 3, 4, 5):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
        trim()
        reset_peak()
        sync(torch, args)
        start = time.perf_counter()
        bookkeeping.append(train_step(model, opt, suite, ids, args, torch, step, force=step == 5, announce=announce))
        sync(torch, args)
        times.append(time.perf_counter() - start)
        peaks[f"step {step}"] = rss_bytes("VmHWM") - base_rss
        if step == 2:
            trim()
            resident = rss_bytes() - base_rss
    state_bytes = w0_bytes = 0
    trim()
    reset_peak()
    if suite is not None:  # what a checkpoint does with the instruments: take their state, write it
        state = suite.state_dict()
        state_bytes = sum(t.numel() * t.element_size() for t in state.values())
        from safetensors.torch import save_file  # noqa: PLC0415
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(args.scratch, "s.st"))
        w0_bytes = sum(p.stat().st_size for p in Path(args.scratch).glob("W0-*.safetensors"))
        del state
    peaks["checkpoint"] = rss_bytes("VmHWM") - base_rss
    # a due step's optimizer step (hooks, metrics) against step 2's, which computes nothing
    computes = [b - bookkeeping[1] for b in bookkeeping[2:]] if suite is not None else []
    return {"shape": args.shape, "mode": args.mode, "variant": args.variant, "tracked": tracked,
            "resident": resident, "peak": max(peaks.values()), "peaks": peaks, "state": state_bytes,
            "w0_file": w0_bytes, "step1": times[0], "step2": times[1], "computes": computes,
            "tokens": args.batch * args.seq}


def train_step(model, opt, suite, ids, args, torch, step: int | None = None, force: bool = False,
               announce: bool = False) -> float:
    """Forward, token-mean CE, backward, the suite's bookkeeping, AdamW step, as trainers/ce.py drives it.
    Returns the seconds from the optimizer step's start to the suite's bookkeeping's end (where a due
    step computes its metrics, in this version or an older one)."""
    with autocast(torch, args):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    if suite is not None:
        suite.set_loss_normalizer(ids[:, 1:].numel())
    loss.backward()
    sync(torch, args)
    start = time.perf_counter()
    if announce:
        suite.before_optimizer_step(step, force=force)
    opt.step()
    if suite is not None:
        suite.after_optimizer_step(step, force=force)
    sync(torch, args)
    elapsed = time.perf_counter() - start
    opt.zero_grad(set_to_none=True)
    return elapsed


def _tracked(model):
    from weightgeom.hooks.roles import resolve_tracked  # noqa: PLC0415
    return resolve_tracked(model)


def sync(torch, args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(torch, args):
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)


# ----- step ratio: plain vs instrumented at a realistic token count --------------------------------------
def step_ratio(args) -> dict:
    """Two identical models in one process, steps alternating (order flipped each round), medians."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    plain, inst = build(args, torch), build(args, torch)
    opt_p = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
    opt_i = torch.optim.AdamW([p for p in inst.parameters() if p.requires_grad], lr=1e-4)
    suite = suite_for(inst, args)
    suite.attach(inst, opt_i)
    vocab = plain.config.vocab_size
    g = torch.Generator().manual_seed(1)
    t_plain, t_inst = [], []
    for rnd in range(args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
        order = [(plain, opt_p, None, t_plain), (inst, opt_i, suite, t_inst)]
        for model, opt, s, out in (order if rnd % 2 == 0 else order[::-1]):
            sync(torch, args)
            start = time.perf_counter()
            train_step(model, opt, s, ids, args, torch, rnd + 1)
            sync(torch, args)
            if rnd > 0:  # the first round warms up
                out.append(time.perf_counter() - start)
    return {"shape": args.shape, "mode": args.mode, "tokens": args.batch * args.seq,
            "plain": statistics.median(t_plain), "instrumented": statistics.median(t_inst)}


# ----- the prediction subspace at real vocabularies ---------------------------------------------------
def prediction_cost(args) -> list[dict]:
    """The prediction subspace of a random (vocab, d) unembedding at Llama-3.2-1B's and Llama-3-8B's
    vocabulary and widths: a full ``eigh`` of the Gram (the dense path) vs the top-k solver through the
    Gram and matrix-free (the paths above ``dense_max_dim``), and the angle between their subspaces."""
    import torch  # noqa: PLC0415

    from weightgeom.hooks import eigensolver as eig  # noqa: PLC0415
    from weightgeom.hooks.measurement import _PredictionOperator  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    out = []
    for vocab, d in ((128256, 2048), (128256, 4096)):
        op = _PredictionOperator(torch.randn(vocab, d, generator=torch.Generator().manual_seed(0)) / d**0.5,
                                 None, False)
        row = {"vocab": vocab, "d": d}
        start = time.perf_counter()
        gram = op.gram_matrix()
        row["gram_s"] = time.perf_counter() - start
        start = time.perf_counter()
        dense = eig.full_eigenpairs(gram, 8)
        row["eigh_s"] = time.perf_counter() - start
        start = time.perf_counter()
        via_gram = eig.top_eigenpairs(gram.__matmul__, d, 8, device=gram.device)
        row["topk_on_gram_s"] = time.perf_counter() - start
        start = time.perf_counter()
        free = eig.top_eigenpairs(op.gram_apply, d, 8, device=gram.device)
        row["matrix_free_s"], row["products"] = time.perf_counter() - start, free.iterations
        for name, result in (("gram", via_gram), ("free", free)):
            Y, X = result.top(8), dense.top(8)
            row[f"sin_{name}_vs_eigh"] = float(torch.linalg.matrix_norm(Y - X @ (X.T @ Y), ord=2))
        out.append(row)
        del op, gram
    return out


# ----- the parent ----------------------------------------------------------------------------------------
def run_child(cli: list[str], repo: Path, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run([sys.executable, __file__, "--child", "--repo", str(repo), "--scratch", scratch, *cli],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(rows: list[dict]) -> None:
    print("| shape | mode | variant | resident | extra (copies) | peak | peak extra (copies) | state (copies) "
          "| W0 file | step 1 / 2 (s) | metric computation: cold / warm / last (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    plain = {(r["shape"], r["mode"]): r for r in rows if r.get("variant") == "plain"}
    for r in rows:
        if "error" in r:
            print(f"| {r.get('shape')} | {r.get('mode')} | {r.get('variant')} | error: {r['error']} |")
            continue
        copy = 4 * r["tracked"]
        p = plain.get((r["shape"], r["mode"]))
        extra = f"{(r['resident'] - p['resident']) / copy:+.2f}" if p and r is not p else "-"
        peak_extra = f"{(r['peak'] - p['peak']) / copy:+.2f}" if p and r is not p else "-"
        compute = " / ".join(f"{t:.2f}" for t in r["computes"]) or "-"
        state = f"{gib(r['state'])} ({r['state'] / copy:.2f})" if r["variant"] != "plain" else "-"
        w0 = gib(r["w0_file"]) if r["w0_file"] else "-"
        print(f"| {r['shape']} | {r['mode']} | {r['variant']} | {gib(r['resident'])} | {extra} | {gib(r['peak'])} "
              f"| {peak_extra} | {state} | {w0} | {r['step1']:.2f} / {r['step2']:.2f} | {compute} |")
    print("\n(copies: fp32 copies of the tracked weights; one copy =", ", ".join(
        f"{s}: {gib(4 * tracked)}" for s, tracked in {s: r["tracked"] for (s, _), r in plain.items()}.items()) + ")")
    print("\npeak of each phase (GiB above the process's memory after imports):")
    for r in rows:
        if "peaks" in r:
            print(f"  {r['shape']} {r['mode']} {r['variant']}: " +
                  ", ".join(f"{name} {gib(v)}" for name, v in r["peaks"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,1b,8b")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--variants", default="plain,instrumented,disk")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=None, help="batch x seq for --step-ratio (seq = tokens / batch)")
    ap.add_argument("--block-vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gram-precision", default="fp32")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds of --step-ratio")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose weightgeom the children import (another version: its before numbers)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--step-ratio", action="store_true")
    ap.add_argument("--pred", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo))
    if args.tokens:
        args.seq = args.tokens // args.batch
    if args.child:
        global CUDA
        CUDA = args.device.startswith("cuda")
        print(json.dumps(step_ratio(args) if args.step_ratio else child(args)))
        return
    if args.pred:
        for row in prediction_cost(args):
            print(json.dumps(row))
        return
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--block-vocab", str(args.block_vocab),
              "--threads", str(args.threads), "--device", args.device, "--gram-precision", args.gram_precision,
              "--steps", str(args.steps)] + (["--bf16"] if args.bf16 else [])
    rows = []
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            if args.step_ratio:
                row = run_child(common + ["--step-ratio", "--shape", shape, "--mode", mode, "--variant",
                                          "instrumented"], args.repo, args.timeout)
                print(json.dumps(row), flush=True)
                if "error" not in row:
                    print(f"  {shape} {mode}, {row['tokens']} tokens: plain {row['plain']:.2f} s, instrumented "
                          f"{row['instrumented']:.2f} s, ratio {row['instrumented'] / row['plain']:.3f}x", flush=True)
                continue
            for variant in args.variants.split(","):
                row = run_child(common + ["--shape", shape, "--mode", mode, "--variant", variant], args.repo,
                                args.timeout)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if rows:
        report(rows)


if __name__ == "__main__":
    main()
