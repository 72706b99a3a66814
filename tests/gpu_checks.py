"""Bodies of the GPU tests, callable on any device.

tests/e2e/test_gpu.py runs them on CUDA (skipped without a GPU; CI has none); tests/e2e/test_gpu_checks_on_cpu.py
runs them once on the CPU with fewer steps, so every code path here is exercised on every CI run and a
later GPU session finds no broken helper. Each check asserts what it names and returns what it measured.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import peft
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tests.conftest import make_batch, make_model, token_loss_sum
from tests.hooks.test_gram import gram_precision_errors
from tests.tiny import ListSink, constant_pairs, tiny_tokenizer
from weightgeom.core.config import GradedObjective, load_config
from weightgeom.core.data import batch_indices, tokenize_pairs
from weightgeom.core.sinks import read_metrics
from weightgeom.core.stage_inputs import load_pairs, split_pairs, stage_tokenizer
from weightgeom.hooks.gram import Gram, symmetric
from weightgeom.hooks.roles import ROLES
from weightgeom.hooks.suite import InstrumentSuite
from weightgeom.trainers.callback import WeightGeomCallback
from weightgeom.trainers.ce import pretrain
from weightgeom.trainers.preference import align
from weightgeom.trainers.trl_dpo import PreferenceRows, run_trl_dpo

TOKENS_PER_BATCH = 27  # make_batch(): 3 x 10 tokens, 3 of them padding


@contextlib.contextmanager
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    ``mixed_precision``; these checks run bf16 inside a test process whose other tests ran fp32."""
    AcceleratorState._reset_state(True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)


def statistics_after_steps(device: str, steps: int = 2) -> dict[str, torch.Tensor]:
    """Instrument state (covariances, step count, W0 digest) and every tracked matrix's cumulative delta
    (``delta/L{i}/{r}``) of the tiny llama after ``steps`` SGD steps on ``device``."""
    model = make_model("llama").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    suite = InstrumentSuite(model, k=4, every_n=10**6, zscores=False)
    with suite.attached(model, opt):
        for step in range(1, steps + 1):
            batch = {k: v.to(device) for k, v in make_batch(seed=step).items()}
            loss, n = token_loss_sum(model, batch)
            suite.set_loss_normalizer(n)
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            suite.after_optimizer_step(step)
    out = {k: v.detach().cpu() for k, v in suite.state_dict().items()}
    out.update({f"delta/{tm.key}": suite.upd.delta(tm).detach().cpu() for tm in suite.tracked})
    return out


def expected_state_keys(layers: int = 2) -> set[str]:
    """What the default suite must record on the tiny llama: ``C_a`` of the read-side input groups,
    ``C_delta`` of the write roles, and the cumulative delta of every role (the state itself holds no
    weights: it names W0 by digest)."""
    keys = set()
    for i in range(layers):
        for group in ("attn_in", "mlp_in"):
            keys |= {f"cov_in/L{i}/{group}/{p}" for p in ("sum_outer", "sum", "count")}
        for role in ("o", "down"):
            keys |= {f"cov_out/L{i}/{role}/{p}" for p in ("sum_outer", "count")}
        keys |= {f"delta/L{i}/{role}" for role in ROLES}
    return keys


def check_statistics_match_cpu(device: str, steps: int = 2) -> int:
    """The same statistics on ``device`` as on the CPU: every expected key present on both, every count
    the number of non-padding tokens (so an empty state cannot pass), values within fp32 rounding.
    Returns the number of keys compared."""
    cpu, other = statistics_after_steps("cpu", steps), statistics_after_steps(device, steps)
    expected = expected_state_keys()
    for name, state in (("cpu", cpu), (device, other)):
        missing = expected - state.keys()
        assert not missing, f"{name} state lacks {sorted(missing)[:5]}"
        for key in (k for k in expected if k.endswith("count")):
            assert int(state[key]) == steps * TOKENS_PER_BATCH, (name, key, float(state[key]))
    assert int(other["weights/steps"]) == steps
    compared = 0
    for key in sorted(expected):
        torch.testing.assert_close(other[key], cpu[key], rtol=1e-3, atol=1e-5, msg=key)
        compared += 1
    return compared


def check_no_host_sync(device: str) -> None:
    """The instruments' per-step work issues no host sync: a forward + backward through hooked modules
    (no padding mask: nothing to look up) and an optimizer step with the update instrument, under
    ``torch.cuda.set_sync_debug_mode("error")`` (any sync raises). On the CPU the mode does not exist
    and this only exercises the code."""
    from weightgeom.hooks.covariance import CovarianceInstrument  # noqa: PLC0415
    from weightgeom.hooks.roles import TrackedMatrix  # noqa: PLC0415
    from weightgeom.hooks.updates import UpdateInstrument  # noqa: PLC0415

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(device)
    tracked = [TrackedMatrix(0, "q", net[0]), TrackedMatrix(0, "o", net[2])]
    cov = CovarianceInstrument(tracked, input_roles=("q",), output_roles=("o",), max_tokens=5)
    upd = UpdateInstrument(tracked, coherence=True)  # on its own it captures every step's update and gradient
    opt = torch.optim.SGD(net.parameters(), lr=0.1, foreach=True)
    x = torch.randn(4, 3, 16, device=device)
    cuda = torch.device(device).type == "cuda"
    with cov.attached(net), upd.attached(net, opt):
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = net(x).square().sum()
                loss.backward()
                opt.step()
                opt.zero_grad()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    state = cov.state_dict()
    assert int(state["cov_in/L0/attn_in/count"]) == 2 * 5 and int(state["cov_out/L0/o/count"]) == 2 * 5
    assert upd.steps == 2 and float(upd.grad_sq["L0/o"]) > 0 and upd.update["L0/o"].abs().sum() > 0


def check_gram_precision(device: str) -> dict[str, float]:
    """tf32 / bf16 Gram products against fp32 on ``device``: counts identical, sums within 1e-2
    (relative Frobenius; measured 1.5e-3 for bf16 on CPU). On CUDA both modes must actually round
    (a nonzero difference); on CPU TF32 does not exist and must equal fp32."""
    errors = gram_precision_errors(device)
    assert 0.0 < errors["bf16"] < 1e-2, errors
    assert errors["tf32"] < 1e-2, errors
    if torch.device(device).type != "cuda":
        assert errors["tf32"] == 0.0, errors
    # one product large enough that cuBLAS surely takes the tensor-core path: each mode must round
    # visibly more than exact fp32 (else it silently ran in fp32) and stay within its unit roundoff
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g).to(device)
    exact = x.double().T @ x.double()
    for precision, unit in (("fp32", 2.0 ** -20), ("tf32", 2.0 ** -11), ("bf16", 2.0 ** -8)):
        acc = torch.zeros(256, 256, device=device)
        Gram(precision).accumulate(acc, x)
        errors[f"{precision}_4096x256"] = float((symmetric(acc).double() - exact).norm() / exact.norm())
        assert errors[f"{precision}_4096x256"] < 4 * unit, errors
    if torch.device(device).type == "cuda":
        assert errors["tf32_4096x256"] > 10 * errors["fp32_4096x256"], errors
        assert errors["bf16_4096x256"] > 10 * errors["fp32_4096x256"], errors
    return errors


def check_ce_pretraining_bf16(tmp_path: Path, steps: int = 30) -> Path:
    """CE pretraining of the smoke recipe under bf16 autocast: the loss falls, the streamed geometry is
    finite, and the instruments counted every token of every step. Returns the final checkpoint."""
    cfg = load_config("recipes/asymmetry_smoke.yaml", [
        f"output_dir={tmp_path}", f"tokenizer.cache_dir={tmp_path / 'tok'}", "stages=[pretrain]",
        "train.mixed_precision=bf16", f"train.steps={steps}", "train.eval_every=0", "train.log_every=1",
        f"instruments.every_n={max(1, steps // 3)}"])
    with fresh_accelerate_state():
        result = pretrain(cfg, tmp_path / "pretrain", progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    geometry = [r for r in rows if "rsf_in/all/q" in r]
    assert geometry, "no geometry row was logged"
    assert all(math.isfinite(v) for k, v in geometry[-1].items() if k.startswith(("rsf_", "z_", "spike_")))
    snap = load_file(str(result.run_dir / "instruments" / f"step_{steps:07d}.safetensors"))
    tokens = cfg.train.batch_size * cfg.data.seq_len  # packed blocks: no padding
    assert int(snap["cov_in/L0/attn_in/count"]) == steps * tokens
    assert int(snap["cov_out/L1/down/count"]) == steps * tokens
    return result.checkpoint


def check_graded_loop_bf16(tmp_path: Path, init_dir: Path, steps: int = 6) -> dict[str, float]:
    """The graded preference loop (grade 0.5) under bf16 autocast from ``init_dir`` (a checkpoint of
    :func:`check_ce_pretraining_bf16`): finite metrics, and the instruments counted exactly the
    policy's non-padding tokens of chosen + rejected (never the no-grad reference pass)."""
    cfg = load_config("recipes/asymmetry_smoke.yaml", [
        f"output_dir={tmp_path}", f"tokenizer.cache_dir={tmp_path / 'tok'}", "align.train.mixed_precision=bf16",
        f"align.train.steps={steps}", "align.train.log_every=1", "align.n_pairs=40",
        f"instruments.every_n={max(1, steps // 2)}"])
    tokenizer = stage_tokenizer(cfg, init_dir)
    pairs, eval_pairs = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    with fresh_accelerate_state():
        result = align(cfg, GradedObjective(name="g0.5", grade=0.5), init_dir, tmp_path / "g0.5",
                       tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["pref/loss"] for r in rows if "pref/loss" in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    geometry = [r for r in rows if "rsf_out_pred/all/o" in r]
    assert geometry and all(math.isfinite(v) for k, v in geometry[-1].items() if k.startswith(("rsf_", "z_")))
    expected = assert_policy_tokens_counted(cfg, pairs, tokenizer, result.run_dir)
    return {"loss_first": losses[0], "loss_last": losses[-1], "tokens": float(expected)}


def assert_policy_tokens_counted(cfg, pairs: list[dict], tokenizer, run_dir: Path) -> int:
    """The final snapshot of a preference run counted exactly the policy's non-pad tokens of chosen +
    rejected over every step's batch (no reference or eval pass); returns that count."""
    t = cfg.align.train
    data = tokenize_pairs(pairs, tokenizer, cfg.align.max_len)
    expected = 0
    for step in range(t.steps):
        idx = batch_indices(len(pairs), t.batch_size * t.grad_accum, step, cfg.seed)
        expected += int(data["chosen_attention_mask"][idx].sum() + data["rejected_attention_mask"][idx].sum())
    snap = load_file(str(run_dir / "instruments" / f"step_{t.steps:07d}.safetensors"))
    assert int(snap["cov_in/L0/attn_in/count"]) == expected
    assert int(snap["cov_out/L1/o/count"]) == expected
    return expected


def check_trl_dpo_lora(tmp_path: Path, steps: int = 4, bf16: bool = True) -> dict[str, float]:
    """TRL's DPOTrainer with a LoRA adapter (q, v), under bf16 autocast (``DPOConfig(bf16=True)``) or in
    fp32, the real instruments as a callback: counts equal the policy's grad-enabled non-pad tokens (the
    adapter-disabled reference pass runs under no_grad and is not counted), LoRA's effective q delta
    has finite geometry, frozen roles (k, gate) report none."""
    model = make_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    sink = ListSink()
    instruments = WeightGeomCallback(k=4, every_n=2, sink=sink, summary=False)
    seen = {"grad": 0, "no_grad": 0}

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen["grad" if torch.is_grad_enabled() else "no_grad"] += int(mask.sum())

    handle = model.get_base_model().register_forward_pre_hook(count, with_kwargs=True)
    try:
        with fresh_accelerate_state():
            trainer = run_trl_dpo(model, tiny_tokenizer(), constant_pairs(8), tmp_path / "trl", steps=steps,
                                  lr=1e-2, beta=0.5, batch_size=2, max_length=16, seed=0,
                                  callbacks=[instruments, PreferenceRows(sink)], extra_args={"bf16": bf16})
    finally:
        handle.remove()
    assert trainer.state.global_step == steps
    assert seen["no_grad"] > 0, "TRL ran no reference pass: the check would prove nothing"
    state = instruments.suite.cov.global_state()
    assert int(state["cov_in/L0/attn_in/count"]) == seen["grad"] > 0
    assert int(state["cov_out/L1/o/count"]) == seen["grad"]
    geometry = [row for _, row in sink.rows if "rsf_in/L0/q" in row]
    assert geometry and math.isfinite(geometry[-1]["rsf_in/L0/q"])
    assert "rsf_in/L0/k" not in geometry[-1] and "rsf_in/L0/gate" not in geometry[-1]
    losses = [row["pref/loss"] for _, row in sink.rows if "pref/loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)
    return {"tokens": float(seen["grad"]), "rsf_in_q": geometry[-1]["rsf_in/L0/q"]}
