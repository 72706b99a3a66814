"""Cost of full-rate instruments: one training step with vs without ``InstrumentSuite`` attached, and peers.

A step is forward + backward + AdamW step on a batch of random tokens (no padding, as the CE
pretraining loop feeds packed blocks), fp32 or under bf16 autocast (``--bf16``), on the CPU or a GPU
(``--device cuda``). The instrumented model carries the default roles (``weightgeom.hooks.suite.SuiteConfig``):
``C_a`` per input group, ``C_delta`` for the write roles and the update instrument on the optimizer,
accumulated on *every* step (``every_n`` huge, so the scheduled metric compute never fires inside
the timed steps; it is timed on its own afterwards).

Each variant is timed against its own plain baseline: two identically initialised models, steps
alternating ABAB (the order flips every step), medians reported. Variants:

    instrumented         SuiteConfig defaults (exact, fp32 Gram products)
    max_tokens=F*N       the same with a token subsample of fraction F per forward (--max-tokens-fraction)
    gram=tf32 / bf16     the same with tensor-core Gram products (--gram-precision; no gain on CPU)
    naive hooks          the straightforward per-module version: forward-pre hook a a^T and
                         register_full_backward_hook d d^T, fp32, full products, for the same modules
                         (every module of an input role, no sharing of q/k/v's input)
    curvlinops KFAC      KFACLinearOperator(fisher_type="empirical").compute_kronecker_factors() on the
                         same model and batch, vs a plain forward + backward (no optimizer step)

It also prints one scheduled metric computation (``InstrumentSuite.compute``) and its ratio to a
plain step, the bytes of statistics per layer, peak memory of a plain vs an instrumented run
(CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS growth), and with ``--gram-error`` the error
of tf32 / bf16 Gram products against fp32 next to the covariance's own sampling error.

``--model DIR_OR_NAME`` times the same on a local model directory, ``.gguf`` file or short name such as
``smollm2-135m-instruct`` (dequantized once; ``weightgeom.core.models.load_local_model``, fp32, train mode;
every copy loaded from disk, so identical) instead of tiny models built from ``--sizes``;
its layers, vocabulary and width are the model's, the batch is ``--batch`` x ``--seq`` random tokens.

    python benchmarks/bench_instruments.py                                   # CPU, hidden 128 and 256
    python benchmarks/bench_instruments.py --model /path/to/SmolLM2-135M --batch 4 --seq 128 --steps 6 \\
        --warmup 1 --no-peers --no-memory --max-tokens-fraction 0
    python benchmarks/bench_instruments.py --device cuda --bf16 --sizes 1024,2048 --layers 12 \\
        --vocab 32000 --batch 16 --seq 1024 --steps 10 --gram-precision tf32,bf16 --gram-error
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from weightgeom.core.model_sources import resolve_model
from weightgeom.core.models import build_tiny_model, check_local_model_dir, load_local_model
from weightgeom.hooks.gram import Gram
from weightgeom.hooks.roles import resolve_tracked
from weightgeom.hooks.suite import InstrumentSuite, SuiteConfig

TARGETS = {"cpu": "<= 1.05x (default tiny model, hidden 128)",
           "cuda": "<= 1.05x full-rate default sides, <= 1.02x with max_tokens = 1/4 (hidden 1024, L12, 16 x 1024)"}


@dataclass
class Shape:
    layers: int
    vocab: int
    batch: int
    seq: int
    device: torch.device
    bf16: bool
    model_dir: str | None = None  # a local model directory instead of tiny models built from sizes
    model_heads: int | None = None  # its attention heads

    def heads(self, hidden: int) -> int:
        return self.model_heads if self.model_dir else max(4, hidden // 64)

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def make_model(hidden: int, shape: Shape) -> torch.nn.Module:
    if shape.model_dir:  # the same weights every time, from disk; train mode like the tiny models
        return load_local_model(shape.model_dir).train().to(shape.device)
    # Built on the target device (a 1B-parameter init on the CPU takes many seconds); same seed, same weights.
    with torch.device(shape.device) if shape.device.type == "cuda" else contextlib.nullcontext():
        model = build_tiny_model("llama", vocab_size=shape.vocab, hidden_size=hidden, num_layers=shape.layers,
                                 num_heads=shape.heads(hidden), max_position_embeddings=max(256, shape.seq), seed=0)
    return model.to(shape.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- one step of each kind ----------------------------------------------------------------------
class Runner:
    """One model and what runs on it per step. ``step(ids, i)`` returns (wall s, process CPU s)."""

    name = "plain"

    def __init__(self, hidden: int, shape: Shape, optimizer: bool = True) -> None:
        self.shape = shape
        self.model = make_model(hidden, shape)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3) if optimizer else None

    def loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        n_predicted = ids[:, 1:].numel()
        with self.shape.autocast():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               reduction="sum")
        return loss, n_predicted

    def before(self, n_predicted: int) -> None: ...

    def after(self, step: int) -> None: ...

    def work(self, ids: torch.Tensor, step: int) -> None:
        """As trainers/ce.py does it: token-sum loss / predicted tokens, backward, optimizer step."""
        loss, n_predicted = self.loss(ids)
        self.before(n_predicted)
        (loss / n_predicted).backward()
        if self.opt is not None:
            self.opt.step()  # the update instrument's optimizer hooks run here
            self.opt.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        self.after(step)

    def step(self, ids: torch.Tensor, step: int) -> tuple[float, float]:
        sync(self.shape.device)
        start, cpu = time.perf_counter(), time.process_time()
        self.work(ids, step)
        sync(self.shape.device)
        return time.perf_counter() - start, time.process_time() - cpu

    def close(self) -> None: ...


class Instrumented(Runner):
    def __init__(self, hidden: int, shape: Shape, cfg: SuiteConfig, name: str) -> None:
        super().__init__(hidden, shape)
        self.name = name
        # every_n = 10**9: statistics on every step, metrics never due during the timed loop.
        self.suite = InstrumentSuite(self.model, cfg, every_n=10**9, log_spaced=False, seed=0)
        self.suite.attach(self.model, self.opt)

    def before(self, n_predicted: int) -> None:
        self.suite.set_loss_normalizer(n_predicted)

    def after(self, step: int) -> None:
        self.suite.after_optimizer_step(step)

    def close(self) -> None:
        self.suite.detach()


class NaiveHooks(Runner):
    """The straightforward per-module instrument: forward-pre hook ``A += a^T a`` and full backward hook
    ``G += d^T d`` (fp32, full products, autocast off), for every module of the suite's input / output roles."""

    name = "naive hooks"

    def __init__(self, hidden: int, shape: Shape, cfg: SuiteConfig) -> None:
        super().__init__(hidden, shape)
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.handles = []
        for tm in resolve_tracked(self.model, cfg.roles):
            if tm.role in cfg.input_roles:
                self.handles.append(tm.module.register_forward_pre_hook(self._pre(tm.key)))
            if tm.role in cfg.output_roles:
                self.handles.append(tm.module.register_full_backward_hook(self._back(tm.key)))

    def _pre(self, key: str):
        def hook(module, args):
            if torch.is_grad_enabled():
                with torch.autocast(device_type=self.shape.device.type, enabled=False):
                    a = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    self.A[key] = self.A[key] + a.T @ a if key in self.A else a.T @ a
        return hook

    def _back(self, key: str):
        def hook(module, grad_input, grad_output):
            with torch.autocast(device_type=self.shape.device.type, enabled=False):
                d = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
                self.G[key] = self.G[key] + d.T @ d if key in self.G else d.T @ d
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class CurvlinopsKFAC(Runner):
    """curvlinops' ``KFACLinearOperator`` (empirical Fisher) computing its Kronecker factors for the
    tracked matrices of the same model on the same batch (forward + backward + factors, no optimizer)."""

    name = "curvlinops KFAC"

    def __init__(self, hidden: int, shape: Shape, cfg: SuiteConfig) -> None:
        super().__init__(hidden, shape, optimizer=False)
        from curvlinops import KFACLinearOperator  # noqa: PLC0415  (optional peer)

        self._cls = KFACLinearOperator
        self.wrapped = _LogitsByClass(self.model, shape)
        self.params = [tm.module.weight for tm in resolve_tracked(self.model, cfg.roles)]

    def work(self, ids: torch.Tensor, step: int) -> None:
        data = [(ids, ids[:, 1:])]
        kfac = self._cls(self.wrapped, torch.nn.CrossEntropyLoss(), self.params, data, fisher_type="empirical",
                         check_deterministic=False, num_data=ids.shape[0], num_per_example_loss_terms=ids.shape[1] - 1)
        kfac.compute_kronecker_factors()
        self.model.zero_grad(set_to_none=True)


class _LogitsByClass(torch.nn.Module):
    """input ids (B, T) -> next-token logits (B, V, T - 1), the class-second layout CrossEntropyLoss wants."""

    def __init__(self, model: torch.nn.Module, shape: Shape) -> None:
        super().__init__()
        self.model, self.shape = model, shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with self.shape.autocast():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return logits[:, :-1].float().transpose(1, 2)


# ----- timing -------------------------------------------------------------------------------------
@dataclass
class Pair:
    name: str
    plain: list[tuple[float, float]] = field(default_factory=list)
    other: list[tuple[float, float]] = field(default_factory=list)

    def ms(self, side: str, clock: int = 0) -> float:
        return 1e3 * statistics.median(t[clock] for t in getattr(self, side))

    @property
    def ratio(self) -> float:
        return self.ms("other") / self.ms("plain")

    @property
    def cpu_ratio(self) -> float:
        return self.ms("other", 1) / self.ms("plain", 1)


def time_pair(name: str, make_plain: Callable[[], Runner], make_other: Callable[[], Runner], shape: Shape,
              steps: int, warmup: int) -> tuple[Pair, Runner]:
    """ABAB: plain and ``other`` alternate on the same batches, the order flipping every step."""
    plain, other = make_plain(), make_other()
    gen = torch.Generator().manual_seed(0)
    pair = Pair(name)
    try:
        for i in range(warmup + steps):
            ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(shape.device)
            sides = [("plain", plain), ("other", other)]
            for side, runner in sides if i % 2 == 0 else sides[::-1]:
                dt = runner.step(ids, i + 1)
                if i >= warmup:
                    getattr(pair, side).append(dt)
    finally:
        other.close()
    del plain
    return pair, other


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(kind: str, hidden: int, shape: Shape, cfg: SuiteConfig, argv: list[str], steps: int = 2) -> float:
    """Peak memory (MiB) of building a ``kind`` ("plain" / "instrumented") model and running ``steps``
    steps on its own. CUDA: peak allocated in this process (the allocator's statistics are exact);
    CPU: peak RSS growth of a fresh process (:func:`memory_probe`), since a process's RSS keeps what
    earlier variants freed."""
    if shape.device.type != "cuda":
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--sizes", str(hidden), "--memory-probe", kind]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        return float(out[-1])
    free(shape.device)
    base = torch.cuda.memory_allocated(shape.device)
    torch.cuda.reset_peak_memory_stats(shape.device)
    runner = _probe_runner(kind, hidden, shape, cfg)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        runner.step(torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(shape.device), i + 1)
    runner.close()
    peak = torch.cuda.max_memory_allocated(shape.device) - base
    del runner
    free(shape.device)
    return peak / 2**20


def _probe_runner(kind: str, hidden: int, shape: Shape, cfg: SuiteConfig) -> Runner:
    return Instrumented(hidden, shape, cfg, "memory") if kind == "instrumented" else Runner(hidden, shape)


def memory_probe(kind: str, hidden: int, shape: Shape, cfg: SuiteConfig, steps: int = 2) -> float:
    """In a fresh process: peak RSS (VmHWM) minus the RSS before building the model, in MiB."""
    base = _status("VmRSS")
    runner = _probe_runner(kind, hidden, shape, cfg)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        runner.step(torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen), i + 1)
    return (_status("VmHWM") - base) / 2**20


def _status(field_name: str) -> float:
    """A field of /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}: peak RSS needs Linux (or pass --no-memory)")


# ----- statistics bytes and gram error ------------------------------------------------------------
def statistics_bytes(suite: InstrumentSuite, layers: int) -> tuple[float, float]:
    """(covariance sums, update-instrument copies) in bytes per layer."""
    cov = sum(t.numel() * t.element_size() for s in suite.cov.sums_in.values() for t in s[:2])
    cov += sum(s[0].numel() * s[0].element_size() for s in suite.cov.sums_out.values())
    upd = 0
    for store in (suite.upd.w0, suite.upd.grad, suite.upd.grad_sum, suite.upd.update, suite.upd._before):
        upd += sum(t.numel() * t.element_size() for t in store.values())
    return cov / layers, upd / layers


def gram_error_table(hidden: int, shape: Shape) -> list[tuple[str, int, int, str, float, float]]:
    """For a few statistics of one batch (inputs of layer 0 and the middle layer, output gradients of
    the last layer): relative Frobenius error of the tf32 / bf16 Gram against fp32, and the sampling
    error ``||C(first half of the batch) - C(second half)|| / ||C||``."""
    model = make_model(hidden, shape)
    tracked = {tm.key: tm for tm in resolve_tracked(model)}
    mid, last = shape.layers // 2, shape.layers - 1
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for label, key in (("C_a L0 attn_in", "L0/q"), (f"C_a L{mid} mlp_in", f"L{mid}/gate")):
        handles.append(tracked[key].module.register_forward_pre_hook(
            lambda m, args, label=label: captured.__setitem__(label, args[0].detach())))
    for label, key in ((f"C_delta L{last} o", f"L{last}/o"), (f"C_delta L{last} down", f"L{last}/down")):
        handles.append(tracked[key].module.register_full_backward_hook(
            lambda m, gi, go, label=label: captured.__setitem__(label, go[0].detach())))
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(2))
    ids = ids.to(shape.device)
    with shape.autocast():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    for h in handles:
        h.remove()
    rows = []
    for label, x in captured.items():
        x = x.reshape(-1, x.shape[-1]).float()
        if label.startswith("C_delta"):
            x = x * x.shape[0]  # per-token deltas, as the instrument scales them
        n_tokens = x.shape[0]

        def cov(rows_: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
            acc = torch.zeros(rows_.shape[1], rows_.shape[1], device=rows_.device)
            Gram(precision).accumulate(acc, rows_)
            return (torch.triu(acc) + torch.triu(acc, 1).T).double() / rows_.shape[0]

        exact = cov(x)
        half = n_tokens // 2
        sampling = float((cov(x[:half]) - cov(x[half:])).norm() / exact.norm())
        for precision in ("tf32", "bf16"):
            err = float((cov(x, precision) - exact).norm() / exact.norm())
            rows.append((label, x.shape[1], n_tokens, precision, err, sampling))
    del model
    free(shape.device)
    return rows


# ----- main ----------------------------------------------------------------------------------------
def bench_size(hidden: int, shape: Shape, cfg: SuiteConfig, args) -> dict:
    n_tokens = shape.batch * shape.seq
    variants: list[tuple[str, Callable[[], Runner], Callable[[], Runner]]] = []
    plain = lambda: Runner(hidden, shape)  # noqa: E731
    variants.append(("instrumented", plain, lambda: Instrumented(hidden, shape, cfg, "instrumented")))
    if args.max_tokens_fraction:
        m = max(1, round(args.max_tokens_fraction * n_tokens))
        sub = SuiteConfig(**{**cfg.__dict__, "max_tokens": m})
        variants.append((f"max_tokens={m}", plain, lambda: Instrumented(hidden, shape, sub, f"max_tokens={m}")))
    for precision in [p for p in (args.gram_precision or "").split(",") if p and p != cfg.gram_precision]:
        alt = SuiteConfig(**{**cfg.__dict__, "gram_precision": precision})
        variants.append((f"gram={precision}", plain, lambda alt=alt, p=precision: Instrumented(hidden, shape, alt, p)))
    if not args.no_peers:
        variants.append(("naive hooks", plain, lambda: NaiveHooks(hidden, shape, cfg)))
    rows = []
    for name, make_plain, make_other in variants:
        pair, other = time_pair(name, make_plain, make_other, shape, args.steps, args.warmup)
        rows.append(pair)
        if name == "instrumented":  # its metric compute and sizes now, before the next pair's two models
            compute_ms = []
            for _ in range(max(1, args.computes)):
                sync(shape.device)
                start = time.perf_counter()
                metrics = other.suite.compute(10**6)
                sync(shape.device)
                compute_ms.append(1e3 * (time.perf_counter() - start))
            cov_bytes, upd_bytes = statistics_bytes(other.suite, shape.layers)
            params = sum(p.numel() for p in other.model.parameters()) / 1e6
            dims = _dims(other.suite)
        del other
        free(shape.device)
    kfac = None if args.no_peers else "not installed"
    if not args.no_peers:
        try:
            import curvlinops  # noqa: F401, PLC0415
        except ImportError:
            pass
        else:
            pair, _ = time_pair("curvlinops KFAC (vs forward + backward)",
                                lambda: Runner(hidden, shape, optimizer=False),
                                lambda: CurvlinopsKFAC(hidden, shape, cfg), shape, args.steps, args.warmup)
            rows.append(pair)
            kfac = None
            free(shape.device)
    memory = None
    if not args.no_memory:
        memory = tuple(peak_memory(kind, hidden, shape, cfg, args.probe_argv) for kind in ("plain", "instrumented"))
    return {"hidden": hidden, "params_M": params, "pairs": rows, "kfac": kfac,
            "compute_ms": statistics.median(compute_ms), "every_n": cfg.every_n,
            "n_metrics": len(metrics), "cov_bytes": cov_bytes, "upd_bytes": upd_bytes, "dims": dims, "memory": memory,
            "gram_error": gram_error_table(hidden, shape) if args.gram_error else []}


def _dims(suite: InstrumentSuite) -> str:
    """Width of each layer-0 covariance, e.g. ``C_a attn_in 128 ... | C_delta o 128 ...``."""
    ins = ", ".join(f"{k.split('/')[1]} {s[0].shape[0]}" for k, s in suite.cov.sums_in.items() if k.startswith("L0/"))
    outs = ", ".join(f"{k.split('/')[1]} {s[0].shape[0]}" for k, s in suite.cov.sums_out.items() if k.startswith("L0/"))
    return f"C_a {ins} | C_delta {outs} (per layer)"


def torch_device(p: argparse.ArgumentParser, args) -> torch.device:
    """``--threads`` applied and ``--device`` checked (a parser error where CUDA is asked for and absent);
    shared by the benchmark scripts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return device


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (statistics stay fp32)")
    p.add_argument("--sizes", default="128,256", help="comma-separated hidden sizes (128 = default tiny model)")
    p.add_argument("--model", default=None, metavar="DIR_OR_NAME",
                   help="a local model directory, .gguf file or short name (smollm2-135m-instruct) instead of "
                        "--sizes (its own layers, vocab and width)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after warmup)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    p.add_argument("--computes", type=int, default=3, help="metric computations to time (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--input-roles", default=None,
                   help="comma-separated roles with C_a (default: the config's; all: q,k,v,o,gate,up,down)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="instruments.max_tokens of the main instrumented variant (default: every token, exact)")
    p.add_argument("--max-tokens-fraction", type=float, default=0.25,
                   help="also time max_tokens = this fraction of the batch's tokens (0: skip)")
    p.add_argument("--gram-precision", default="", help="also time these gram_precision modes, e.g. tf32,bf16")
    p.add_argument("--gram-error", action="store_true", help="print tf32/bf16 Gram error vs fp32 and sampling error")
    p.add_argument("--no-peers", action="store_true", help="skip the naive hooks and curvlinops columns")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--memory-probe", choices=["plain", "instrumented"], help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    device = torch_device(p, args)
    shape = Shape(args.layers, args.vocab, args.batch, args.seq, device, args.bf16)
    if args.model:  # its shape from its config; --layers, --vocab and --sizes do not apply
        args.model = str(resolve_model(args.model))  # a .gguf file or short name: its dequantized directory
        config = AutoConfig.from_pretrained(check_local_model_dir(args.model), local_files_only=True)
        config = config.get_text_config()
        shape = Shape(config.num_hidden_layers, config.vocab_size, args.batch, args.seq, device, args.bf16,
                      model_dir=args.model, model_heads=config.num_attention_heads)
        args.sizes = str(config.hidden_size)
    cfg = SuiteConfig(max_tokens=args.max_tokens)
    if args.input_roles:
        cfg.input_roles = args.input_roles.split(",")
    if args.memory_probe:  # a child of peak_memory on the CPU: print one number and stop
        print(f"{memory_probe(args.memory_probe, int(args.sizes.split(',')[0]), shape, cfg):.1f}")
        return
    # what a CPU memory probe needs to rebuild the same model and suite in a fresh process
    args.probe_argv = [f"--{k}={v}" for k, v in (("layers", args.layers), ("vocab", args.vocab), ("batch", args.batch),
                                                  ("seq", args.seq), ("threads", torch.get_num_threads()))]
    args.probe_argv += ["--bf16"] * args.bf16 + ([f"--input-roles={args.input_roles}"] if args.input_roles else [])
    args.probe_argv += [f"--max-tokens={args.max_tokens}"] if args.max_tokens else []
    args.probe_argv += [f"--model={args.model}"] if args.model else []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = f"model {Path(args.model).name}" if args.model else "llama"
    print(f"torch {torch.__version__}, {where}; {what}, {shape.layers} layers, vocab {shape.vocab}, "
          f"batch {shape.batch} x seq {shape.seq}, {'bf16 autocast' if shape.bf16 else 'fp32'}, AdamW; "
          f"{args.warmup} warmup + {args.steps} timed steps per side, each variant ABAB against its own plain copy")
    print(f"instruments (statistics every step): roles={cfg.roles} input_roles={cfg.input_roles} "
          f"output_roles={cfg.output_roles} max_tokens={cfg.max_tokens} dtype={cfg.dtype} "
          f"gram_precision={cfg.gram_precision}")
    results = [bench_size(int(h), shape, cfg, args) for h in args.sizes.split(",")]
    for r in results:
        print(f"\nhidden {r['hidden']} ({r['params_M']:.1f}M params, heads {shape.heads(r['hidden'])}): {r['dims']}")
        print(f"  {'variant':<42} {'plain ms':>9} {'variant ms':>10} {'ratio':>7} {'cpu ratio':>9}")
        for pair in r["pairs"]:
            print(f"  {pair.name:<42} {pair.ms('plain'):>9.1f} {pair.ms('other'):>10.1f} {pair.ratio:>6.3f}x "
                  f"{pair.cpu_ratio:>8.3f}x")
        if r["kfac"]:
            print(f"  {'curvlinops KFAC':<42} {r['kfac']}")
        plain_ms = r["pairs"][0].ms("plain")
        print(f"  one metric compute (InstrumentSuite.compute, not in the steps): {r['compute_ms']:.0f} ms, "
              f"{r['n_metrics']} metrics; {r['compute_ms'] / plain_ms:.3f}x a plain step, "
              f"+{100 * r['compute_ms'] / (r['every_n'] * plain_ms):.1f}% of the steps at every_n={r['every_n']}")
        print(f"  statistics per layer: covariance sums {r['cov_bytes'] / 2**10:.0f} KiB, "
              f"weight views (W0, pre-step, update, grad, grad sum) {r['upd_bytes'] / 2**20:.1f} MiB")
        if r["memory"]:
            what = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS growth (fresh process each)"
            plain_mb, inst_mb = r["memory"]
            print(f"  {what}: plain {plain_mb:.0f} MiB, instrumented {inst_mb:.0f} MiB (+{inst_mb - plain_mb:.0f} MiB)")
        if r["gram_error"]:
            print("  gram precision error vs fp32 (relative Frobenius) next to the sampling error "
                  "||C(half 1) - C(half 2)|| / ||C||:")
            for label, dim, n_tok, precision, err, sampling in r["gram_error"]:
                print(f"    {label:<20} dim {dim:>5} N {n_tok:>6} {precision}: {err:.2e}   sampling {sampling:.2e}")
    target = "" if args.model else f" Target: {TARGETS[device.type]}."
    print(f"\nratio = median variant step / median plain step, wall clock (synchronised on CUDA); cpu ratio = the same "
          f"in process CPU time.{target}")


if __name__ == "__main__":
    main()
