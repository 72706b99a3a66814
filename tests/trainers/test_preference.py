"""Preference alignment, instrumented: the graded loop learns the embedded set, the instruments
count only the policy's tokens (never the reference pass), TRL + LoRA + real instruments agree;
pair log-probs from a forward cut to the batch and its completions equal a brute force."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import count_host_reads, make_model
from tests.gpu_checks import assert_policy_tokens_counted, check_trl_dpo_lora
from tests.tiny import PROMPTS, tiny_tokenizer
from weightgeom.core.config import GradedObjective, LoraConfig, load_config
from weightgeom.core.data import tokenize_pairs
from weightgeom.core.stage_inputs import load_pairs, split_pairs, stage_tokenizer
from weightgeom.trainers.ce import pretrain
from weightgeom.trainers.pairs import batch_window, pair_logps, takes_logits_to_keep
from weightgeom.trainers.preference import align

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-layer model CE-pretrained for 40 steps on the embedded corpus, and its recipe."""
    root = tmp_path_factory.mktemp("pref")
    cfg = load_config("recipes/asymmetry_smoke.yaml", [
        f"output_dir={root}", f"tokenizer.cache_dir={root / 'tok'}", "train.steps=40", "instruments.enabled=false",
        "align.n_pairs=80", "align.train.steps=30", "align.train.batch_size=8", "align.train.lr=3e-3",
        "align.train.log_every=1", "align.train.warmup_steps=2", "align.beta=0.5", "instruments.every_n=10"])
    result = pretrain(cfg, root / "pretrain", progress=False)
    return cfg, result.checkpoint


def test_graded_dpo_learns_the_embedded_set_and_counts_policy_tokens_only(pretrained, tmp_path):
    cfg, ckpt = pretrained
    cfg.instruments.enabled = True
    tokenizer = stage_tokenizer(cfg, ckpt)
    pairs, eval_pairs = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    result = align(cfg, GradedObjective(name="g1", grade=1.0), ckpt, tmp_path / "g1",
                   tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs, progress=False)
    rows = [r for r in _rows(result.run_dir) if "pref/loss" in r]
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "pref/loss") < mean(first, "pref/loss") - 0.1
    assert mean(last, "pref/accuracy") > mean(first, "pref/accuracy") + 0.2
    assert mean(last, "pref/accuracy") >= 0.8

    # The reference log-probs (and the eval passes) run under no_grad: the instruments count the
    # policy's non-pad tokens of chosen + rejected, step by step, and nothing else.
    assert_policy_tokens_counted(cfg, pairs, tokenizer, result.run_dir)


def test_trl_dpo_with_lora_and_real_instruments_ignores_the_reference_pass(tmp_path):
    """fp32 here; the same check under bf16 autocast runs in tests/e2e/test_gpu_checks_on_cpu.py and on GPUs."""
    check_trl_dpo_lora(tmp_path, steps=4, bf16=False)


def test_the_preference_loop_reads_the_device_once_per_step_and_once_per_logged_row(pretrained, tmp_path,
                                                                                      monkeypatch):
    """As the CE loop (tests/trainers/test_guard.py): the guard's one read per step, one per logged row
    (the pair-weighted pref/* sums come back together), none per micro-batch."""
    cfg, ckpt = pretrained
    cfg = copy.deepcopy(cfg)
    cfg.instruments.enabled = True
    cfg.align.train.steps, cfg.align.train.grad_accum, cfg.align.train.log_every = 6, 2, 4
    tokenizer = stage_tokenizer(cfg, ckpt)
    pairs, _ = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    reads = count_host_reads(monkeypatch, "trainers/session.py", "trainers/preference.py", "trainers/losses.py")
    result = align(cfg, GradedObjective(name="g05", grade=0.5), ckpt, tmp_path / "g05", tokenizer=tokenizer,
                   pairs=pairs, eval_pairs=[], progress=False)
    monkeypatch.undo()
    logged = [r for r in _rows(result.run_dir) if "pref/loss" in r]
    assert 0 < len(logged) < 6
    assert reads == {"trainers/session.py": 6, "trainers/preference.py": 0, "trainers/losses.py": len(logged)}


def _rows(run_dir):
    from weightgeom.core.sinks import read_metrics  # noqa: PLC0415

    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_alignment_resume_matches_continuous_run(pretrained, tmp_path, lora):
    cfg, ckpt = pretrained
    cfg = copy.deepcopy(cfg)
    cfg.instruments.enabled = True
    cfg.align.train.steps, cfg.align.train.save_every = 6, 3
    if lora:
        cfg.align.lora = LoraConfig(r=4, alpha=8)
    tokenizer = stage_tokenizer(cfg, ckpt)
    pairs, eval_pairs = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    objective = GradedObjective(name="g05", grade=0.5)
    kw = dict(tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs, progress=False)
    full = align(cfg, objective, ckpt, tmp_path / "full", **kw)
    cut = align(cfg, objective, ckpt, tmp_path / "cut", **kw)
    step3 = cut.run_dir / "checkpoints" / "step_0000003"
    assert (step3 / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    resumed = align(cfg, objective, ckpt, tmp_path / "cut", resume=step3, **kw)
    for name in ("model.safetensors", "instruments.safetensors"):
        a, b = load_file(str(full.checkpoint / name)), load_file(str(resumed.checkpoint / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    steps = [r["step"] for r in _rows(resumed.run_dir) if "pref/loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 7))


# ----- pair log-probs: the forward cut to the batch's longest row and to its completions --------------
# Prompts of 3-4 words, completions of 1-13: the long chosen of pair 2 sets the width of the whole set.
COMPLETIONS = [(" yes", " no bad"), (" the mat", " a tree"),
               (" very good very good yes the cat sat on the mat under a tree", " no"), (" a", " the dog ran"),
               (" good", " bad bad"), (" the cat sat", " on")]
BATCHES = [[0, 1], [3, 4, 5], [2, 0], [5]]


def _pairs_data():
    pairs = [{"prompt": PROMPTS[i], "chosen": c, "rejected": r} for i, (c, r) in enumerate(COMPLETIONS)]
    return tokenize_pairs(pairs, tiny_tokenizer(), 32)


def _brute_force(model, data, idx: list[int]) -> list[torch.Tensor]:
    """Chosen and rejected log-probs: each row alone at its own length (no padding), full logits,
    log_softmax, a loop over its completion tokens."""
    out = []
    for side in ("chosen", "rejected"):
        values = []
        for i in idx:
            n = int(data[f"{side}_attention_mask"][i].sum())
            ids = data[f"{side}_input_ids"][i, :n]
            logp = model(input_ids=ids[None]).logits[0].log_softmax(-1)
            values.append(sum(logp[t - 1, ids[t]] for t in range(1, n) if data[f"{side}_loss_mask"][i, t]))
        out.append(torch.stack(values))
    return out


# Llama's and NeoX's eager attention take their softmax in float32 even for a float64 model: 1e-8-level
# differences between widths come from there; GPT-2's is in the model's dtype.
@pytest.mark.parametrize("arch, atol", [("gpt2", 1e-12), ("llama", 1e-6), ("gpt_neox", 1e-6)])
def test_pair_logps_match_a_float64_brute_force_with_the_forward_cut_to_batch_and_completions(arch, atol):
    model = make_model(arch).double()
    assert takes_logits_to_keep(model)  # every family of the role table has it in transformers 5
    data = _pairs_data()
    seen, windows = [], []  # (width, logits_to_keep) of every forward; of pair_logps's
    handle = model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["input_ids"].shape[1], kw.get("logits_to_keep"))), with_kwargs=True)
    for idx in BATCHES:
        rows = torch.tensor(idx)
        start = len(seen)
        c, r, n = pair_logps(model, data, rows, "cpu")
        windows += seen[start:]
        brute = _brute_force(model, data, idx)
        torch.testing.assert_close(c, brute[0], atol=atol, rtol=0)
        torch.testing.assert_close(r, brute[1], atol=atol, rtol=0)
        assert torch.equal(n, data["chosen_loss_mask"][rows].sum(-1))
        # the gradient reaches the parameters as from the brute force
        model.zero_grad()
        (c.sum() - 2 * r.sum()).backward()
        ours = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        brute = _brute_force(model, data, idx)
        (brute[0].sum() - 2 * brute[1].sum()).backward()
        for g_ours, p in zip(ours, model.parameters()):
            torch.testing.assert_close(g_ours, p.grad, atol=atol, rtol=1e-6)
    handle.remove()
    # one forward per batch, at the batch's own width, asking for the logits of the positions that
    # predict a completion token only
    expected = [_window(data, idx) for idx in BATCHES]
    assert windows == expected
    set_width = data["chosen_input_ids"].shape[1]
    assert any(w < set_width for w, _ in expected) and all(k < w for w, k in expected)


def _window(data, idx: list[int]) -> tuple[int, int]:
    mask = torch.cat([data["chosen_attention_mask"][idx], data["rejected_attention_mask"][idx]])
    loss = torch.cat([data["chosen_loss_mask"][idx], data["rejected_loss_mask"][idx]])
    width = int(mask.sum(-1).max())
    first = min(int(row.nonzero()[0]) for row in loss)  # the batch's first completion token
    return width, width - first + 1


def test_batch_window_of_edge_cases():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert batch_window(mask, torch.tensor([[0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])) == (3, 3)  # token 1: from 0
    assert batch_window(mask, torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])) == (3, 2)
    assert batch_window(mask, torch.zeros(2, 5, dtype=torch.long)) == (3, 3)  # nothing scored: the whole width
    assert batch_window(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)) == (5, 5)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (as a custom or remote-code class may)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's own call
def test_pair_logps_through_peft_and_through_a_forward_without_logits_to_keep():
    peft = pytest.importorskip("peft")
    data, rows = _pairs_data(), torch.tensor([3, 4, 5])
    model = make_model("llama").double()
    expected = pair_logps(model, data, rows, "cpu")

    plain = _NoLogitsToKeep(model)
    assert not takes_logits_to_keep(plain)
    for got, want in zip(pair_logps(plain, data, rows, "cpu"), expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)

    # LoRA starts as the identity (B = 0): the wrapped model's log-probs are the base model's, and the
    # wrapper passes logits_to_keep on to it
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM")).double()
    assert takes_logits_to_keep(lora)
    kept = []
    handle = lora.get_base_model().register_forward_pre_hook(
        lambda m, args, kw: kept.append(kw.get("logits_to_keep")), with_kwargs=True)
    got = pair_logps(lora, data, rows, "cpu")
    handle.remove()
    assert kept == [_window(data, [3, 4, 5])[1]]
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, atol=1e-12, rtol=0)
