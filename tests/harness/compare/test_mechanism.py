"""The mechanism metric in `harness compare` (``mass=``): the mass of a loss's ``C_delta`` in the prediction
subspace, against a brute force that stores every per-token ``delta`` with plain hooks on a tiny model (energy
inside the subspace over the total energy), its closed-form z-score against sampled Haar subspaces, the
losses' definitions (CE per token; DPO, graded, mixture per pair against the model itself as reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness.compare.test_analysis import D, save_model, text_file, tiny_pair, tokenizer  # noqa: F401
from weightgeom.core.data import load_texts, tokenize_pairs
from weightgeom.core.models import load_local_model
from weightgeom.harness.compare.analysis import compare
from weightgeom.harness.compare.input_covariance import sample_token_batches
from weightgeom.harness.compare.mechanism import activation_gradients_only, mass_pairs
from weightgeom.harness.compare.options import CompareOptions
from weightgeom.hooks import geometry as geo

K = 4
MASS = dict(k=K, k_curve=(1, 2, 8), mass_tokens=300, seq_len=48, batch_size=4, n_pairs=6, max_len=48,
            pairs="embedded", read_side=False, zscores=False)
WRITE = {"o": "self_attn.o_proj", "down": "mlp.down_proj"}


def stored_deltas(model, steps) -> dict[str, torch.Tensor]:
    """Every non-padding token's ``delta`` (N, m), float64, at the output of each layer's o_proj and down_proj,
    stored by plain tensor hooks during an ordinary backward (weights trainable), each scaled by what its
    step's loss was divided by. ``steps``: ``[(mask (R, T), loss function of the model, normalizer)]``."""
    store: dict[str, list] = {}
    handles, scale = [], [1.0]
    for i, layer in enumerate(model.model.layers):
        for role, path in WRITE.items():
            key = f"L{i}/{role}"

            def forward_hook(module, args, output, key=key):
                output.register_hook(lambda g, key=key: store.setdefault(key, []).append(g.detach() * scale[0]))

            handles.append(layer.get_submodule(path).register_forward_hook(forward_hook))
    masks = []
    for mask, loss_of, normalizer in steps:
        scale[0] = float(normalizer)
        loss_of(model).backward()
        masks.append(mask.bool())
        model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    return {key: torch.cat([g.reshape(-1, g.shape[-1])[m.reshape(-1)] for g, m in zip(grads, masks)]).double()
            for key, grads in store.items()}


def brute_mass(deltas: torch.Tensor, V: torch.Tensor, k: int) -> float:
    """Energy of the stored deltas inside span(V[:, :k]) over their total energy, over k / m."""
    inside = (deltas @ V[:, :k]).square().sum()
    return float(inside / deltas.square().sum()) * deltas.shape[1] / k


def prediction_basis(model) -> torch.Tensor:
    M = model.lm_head.weight.detach().double() * model.model.norm.weight.detach().double()
    return torch.linalg.svd(M, full_matrices=False).Vh.T


def ce_steps(batches):
    """Next-token CE per batch, written out: log-softmax, the target's log-prob, mean over predicted tokens."""
    steps = []
    for ids, mask in batches:
        n = int(mask[:, 1:].sum())

        def loss_of(model, ids=ids, mask=mask, n=n):
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            return -(token * mask[:, 1:]).sum() / n

        steps.append((mask, loss_of, n))
    return steps


def pair_steps(data, loss: str, beta: float, pairs_per_batch: int):
    """The preference loss per batch of pairs, written out, with the model's own (detached) log-probs as the
    reference: D_w = D_l = 0 in value, the first alignment step's gradient."""
    steps = []
    n = len(data["chosen_input_ids"])
    for idx in torch.arange(n).split(pairs_per_batch):
        ids, mask, scored = (torch.cat([data[f"chosen_{f}"][idx], data[f"rejected_{f}"][idx]])
                             for f in ("input_ids", "attention_mask", "loss_mask"))
        b = len(idx)

        def loss_of(model, ids=ids, mask=mask, scored=scored, b=b):
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            seq = (logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * scored[:, 1:]).sum(-1)
            chosen, rejected = seq[:b], seq[b:]
            d_w, d_l = chosen - chosen.detach(), rejected - rejected.detach()
            if loss == "mix0.5":
                ce = -chosen.sum() / scored[:b, 1:].sum()
                return 0.5 * ce + 0.5 * -F.logsigmoid(beta * (d_w - d_l)).mean()
            grade = {"dpo": 1.0, "g0.5": 0.5, "g0": 0.0}[loss]
            return -F.logsigmoid(beta * (d_w - grade * d_l)).mean()

        steps.append((mask, loss_of, b))
    return steps


@pytest.mark.parametrize("loss", ["ce", "dpo", "g0.5", "mix0.5"])
def test_mass_matches_stored_per_token_deltas(loss, tokenizer, text_file, tmp_path):  # noqa: F811
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    result = compare(base_dir, after_dir, text=str(text_file), mass=(loss,), device="cpu", **MASS)
    mass = result.mass[loss]
    assert mass.model == "after" and "AFTER model" in mass.source

    after = load_local_model(after_dir)  # AFTER's C_delta, against AFTER's prediction subspace
    options = CompareOptions(text=str(text_file), **MASS)
    if loss == "ce":
        batches = sample_token_batches(tokenizer, load_texts(str(text_file)), n_tokens=300, seq_len=48,
                                       batch_size=4, seed=0)
        assert any(not bool(m.all()) for _, m in batches)  # padding is present, and excluded
        steps = ce_steps(batches)
    else:
        assert "reference = the same model" in mass.source
        pairs, _ = mass_pairs(options, tokenizer)
        steps = pair_steps(tokenize_pairs(pairs, tokenizer, 48), loss, 0.1, pairs_per_batch=2)
    deltas = stored_deltas(after, steps)
    V = prediction_basis(after)
    assert set(mass.mass) == set(deltas) == {"L0/o", "L0/down", "L1/o", "L1/down"}
    for key, stored in deltas.items():
        assert mass.tokens == stored.shape[0]
        assert mass.mass[key] == pytest.approx(brute_mass(stored, V, K), rel=1e-5), key
        for k in (1, 2, 8):
            assert mass.curve[key][k] == pytest.approx(brute_mass(stored, V, k), rel=1e-5), (key, k)
    means = mass.role_means()
    assert result.metrics()[f"mass_pred/all/o/{loss}"] == pytest.approx(means["o"])
    assert result.metrics()[f"mass_pred/L1/down/{loss}"] == mass.mass["L1/down"]


def test_mass_z_is_the_haar_z(tokenizer, text_file, tmp_path):  # noqa: F811
    """The closed-form z against 4000 sampled Haar k-subspaces of the stored deltas' covariance."""
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    result = compare(base_dir, after_dir, text=str(text_file), mass=("ce",), device="cpu", **MASS)
    after = load_local_model(after_dir)
    batches = sample_token_batches(tokenizer, load_texts(str(text_file)), n_tokens=300, seq_len=48, batch_size=4,
                                   seed=0)
    generator = torch.Generator().manual_seed(0)
    for key, stored in stored_deltas(after, ce_steps(batches)).items():
        C = stored.T @ stored / stored.shape[0]
        Q = geo.haar_subspaces(4000, D, K, generator)
        sampled = ((C @ Q) * Q).sum((1, 2)) / torch.trace(C)  # tr(Q^T C Q) / tr C per subspace
        observed = result.mass["ce"].mass[key] * K / D
        z_sampled = float((observed - sampled.mean()) / sampled.std())
        z = result.mass["ce"].z[key]
        assert abs(z) > 1.0, key  # a real effect, so the comparison below is not of two noises
        assert z == pytest.approx(z_sampled, rel=0.05, abs=0.05), key


def test_only_activation_gradients_and_layers(tokenizer, text_file, tmp_path):  # noqa: F811
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    result = compare(base_dir, after_dir, text=str(text_file), mass=("ce", "g0"), layers=(1,), mass_model="base",
                     device="cpu", **MASS)
    assert set(result.mass["ce"].mass) == {"L1/o", "L1/down"} and result.mass["g0"].model == "base"
    assert {m.layer for m in result.matrices} == {1}
    model = load_local_model(after_dir)
    with activation_gradients_only(model):
        out = model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum()
        out.backward()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # restored, and never written


def test_mass_report_and_bad_options(tokenizer, text_file, tmp_path):  # noqa: F811
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    compare(base_dir, after_dir, text=str(text_file), mass=("ce", "dpo"), device="cpu", out_dir=tmp_path / "out",
            **MASS)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Mechanism: C_delta's mass in the prediction subspace" in report and "| dpo |" in report
    assert (tmp_path / "out" / "mass_k_curve.png").is_file()
    for changes, message in (({"mass": ("xe",)}, "--mass: unknown loss 'xe'"), ({"mass": ("mix2",)}, "--mass mix2"),
                             ({"mass": ("ce", "ce")}, "--mass repeats"), ({"beta": 0.0}, "--beta"),
                             ({"mass_model": "x"}, "--mass-model")):
        with pytest.raises(ValueError, match=message):
            CompareOptions(**changes)
    with pytest.raises(FileNotFoundError, match="--pairs 'nothing.jsonl': no such file"):
        compare(base_dir, after_dir, mass=("dpo",), pairs="nothing.jsonl", read_side=False, device="cpu")
