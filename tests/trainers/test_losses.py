"""The graded contrastive family: TRL's DPO at g = 1, the chosen-only gradient at g = 0, the
mixture's end points, sequence log-probs against a per-token loop, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from tests.conftest import make_model
from tests.tiny import PROMPTS, tiny_tokenizer
from weightgeom.core.config import DpoObjective, GradedObjective, LikelihoodObjective, MixtureObjective, TrlObjective
from weightgeom.trainers.losses import (
    LOSSES,
    DPOLoss,
    GradedLoss,
    LikelihoodLoss,
    MixtureLoss,
    build_loss,
    check_objectives,
    sequence_logps,
)

BETA = 0.5


def random_logps(batch: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Summed log-probs of plausible size (tens of nats) with distinct policy and reference values."""
    g = torch.Generator().manual_seed(seed)
    logps = {name: -20 * torch.rand(batch, generator=g, dtype=torch.float64) for name in
             ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    logps["chosen_token_counts"] = torch.randint(1, 9, (batch,), generator=g)
    return logps


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own call
def test_graded_at_one_matches_trl_sigmoid_dpo(tmp_path):
    """TRL's own DPOTrainer.compute_loss on a real padded batch, against GradedLoss(1) fed with our
    sequence_logps of the same policy and (differently initialised) reference."""
    completions = [(" yes very good", " no"), (" the mat", " bad tree under a"), (" no", " yes good")]
    pairs = [{"prompt": PROMPTS[i], "chosen": c, "rejected": r} for i, (c, r) in enumerate(completions)]
    policy, reference = make_model("llama", seed=0), make_model("llama", seed=1)
    with torch.no_grad():  # a freshly initialised head gives near-uniform logits: sharpen the policy's
        policy.lm_head.weight.mul_(50.0)
    args = DPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type="sigmoid", report_to="none", use_cpu=True,
                     bf16=False, max_length=32, activation_checkpointing=False, gradient_checkpointing=None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tiny_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    assert batch["attention_mask"].min() == 0  # padding is exercised

    trl_loss = trainer.compute_loss(policy, batch)

    def logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])

    policy_logps, counts = logps(policy)
    with torch.no_grad():
        ref_logps, _ = logps(reference)
    chosen, rejected = policy_logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    out = GradedLoss(grade=1.0, beta=BETA)(chosen, rejected, ref_chosen, ref_rejected, counts.chunk(2)[0])

    assert abs(out.metrics["pref/margin"]) > 1.0, out.metrics  # far from the trivial log 2 point
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert out.metrics["pref/reward_chosen"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert out.metrics["pref/reward_rejected"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    assert out.metrics["pref/margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
    assert out.metrics["pref/accuracy"] == trl_metrics["rewards/accuracies"]


@pytest.mark.parametrize("grade", [0.0, 0.5, 1.0])
def test_graded_gradients_match_the_closed_form(grade):
    """dL/d(policy_chosen) = -beta s / B, dL/d(policy_rejected) = g beta s / B, s = sigmoid(-z),
    z = beta (D_w - g D_l); at g = 0 the rejected gradient is exactly zero."""
    x = random_logps()
    for name in ("policy_chosen_logps", "policy_rejected_logps"):
        x[name].requires_grad_(True)
    GradedLoss(grade, BETA)(**x).loss.backward()

    d_w = (x["policy_chosen_logps"] - x["ref_chosen_logps"]).detach()
    d_l = (x["policy_rejected_logps"] - x["ref_rejected_logps"]).detach()
    s = torch.sigmoid(-BETA * (d_w - grade * d_l))
    batch = len(d_w)
    torch.testing.assert_close(x["policy_chosen_logps"].grad, -BETA * s / batch)
    torch.testing.assert_close(x["policy_rejected_logps"].grad, grade * BETA * s / batch)
    if grade == 0.0:
        assert torch.equal(x["policy_rejected_logps"].grad, torch.zeros(batch, dtype=torch.float64))


def test_likelihood_is_the_chosen_only_objective():
    """g = 0 has the value and gradient of -log sigmoid(beta D_w): the rejected side plays no part."""
    x = random_logps()
    chosen = x["policy_chosen_logps"].requires_grad_(True)
    LikelihoodLoss(BETA)(**x).loss.backward()
    graded_grad = chosen.grad.clone()
    chosen.grad = None
    (-F.logsigmoid(BETA * (chosen - x["ref_chosen_logps"]))).mean().backward()
    torch.testing.assert_close(graded_grad, chosen.grad)

    y = dict(x, policy_rejected_logps=x["policy_rejected_logps"] + 7.0)
    assert LikelihoodLoss(BETA)(**y).loss.item() == LikelihoodLoss(BETA)(**x).loss.item()
    assert DPOLoss(BETA)(**x).loss.item() == GradedLoss(1.0, BETA)(**x).loss.item()


def test_mixture_end_points_and_interpolation():
    x = random_logps()
    ce = -x["policy_chosen_logps"].sum() / x["chosen_token_counts"].sum()
    dpo = DPOLoss(BETA)(**x).loss
    torch.testing.assert_close(MixtureLoss(1.0, BETA)(**x).loss, ce)
    torch.testing.assert_close(MixtureLoss(0.0, BETA)(**x).loss, dpo)
    torch.testing.assert_close(MixtureLoss(0.3, BETA)(**x).loss, 0.3 * ce + 0.7 * dpo)


def test_metrics_follow_trls_definitions():
    # D_w = (1, 0, 0), D_l = (0, 2, 0): one pair strictly preferred, one reversed, one tied.
    x = {"policy_chosen_logps": torch.tensor([1.0, 0.0, -3.0]), "ref_chosen_logps": torch.tensor([0.0, 0.0, -3.0]),
         "policy_rejected_logps": torch.tensor([-1.0, 2.0, -5.0]),
         "ref_rejected_logps": torch.tensor([-1.0, 0.0, -5.0]), "chosen_token_counts": torch.tensor([2, 2, 2])}
    out = GradedLoss(1.0, BETA)(**x)
    assert out.metrics["pref/reward_chosen"] == pytest.approx(BETA / 3)
    assert out.metrics["pref/reward_rejected"] == pytest.approx(2 * BETA / 3)
    assert out.metrics["pref/margin"] == pytest.approx(-BETA / 3)
    assert out.metrics["pref/accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    expected = -(F.logsigmoid(torch.tensor([BETA, -2 * BETA, 0.0]))).mean()
    assert out.metrics["pref/loss"] == pytest.approx(expected.item()) == pytest.approx(out.loss.item())


def test_sequence_logps_matches_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    logps, counts = sequence_logps(logits, ids, mask)

    for b in range(3):
        expected, n = 0.0, 0
        for t in range(1, 6):  # token t is predicted at position t - 1; token 0 never is
            if mask[b, t]:
                expected += torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
                n += 1
        assert logps[b].item() == pytest.approx(expected, abs=1e-5)
        assert counts[b].item() == n
    assert counts.dtype == torch.long

    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(logits, ids, mask[:, :-1])


def test_sequence_logps_equals_gather_minus_logsumexp_in_value_and_gradient():
    """The one-buffer backward (TokenLogps) against autograd through the explicit ``gather - logsumexp``
    of the shifted logits (the expression this module used before): the same values and gradients w.r.t.
    every logit, bit for bit in float32 (zero at unscored positions and at the last one, which predicts
    nothing), to 1e-12 in float64; half-precision logits are scored in float32."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 13, (4, 9), generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.4).long()
    mask[3] = 0  # a row with nothing to score
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def explicit(x):
        shifted = x[:, :-1]
        token = shifted.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - shifted.logsumexp(-1)
        return token.masked_fill(~mask[:, 1:].bool(), 0.0).sum(-1)

    for dtype, atol in ((torch.float32, 0.0), (torch.float64, 1e-12)):
        logits = 4 * torch.randn(4, 9, 13, generator=g, dtype=dtype)
        ours, theirs = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        logps, counts = sequence_logps(ours, ids, mask)
        expected = explicit(theirs)
        assert logps.dtype == dtype and logps[3].item() == 0.0 and counts[3].item() == 0
        torch.testing.assert_close(logps, expected, atol=atol, rtol=0)
        (logps * weights.to(dtype)).sum().backward()
        (expected * weights.to(dtype)).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, atol=atol, rtol=0)
        assert ours.grad[:, -1].abs().max() == 0 and ours.grad[3].abs().max() == 0
        torch.testing.assert_close(counts, mask[:, 1:].sum(-1))

    half, _ = sequence_logps(logits.to(torch.bfloat16), ids, mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, explicit(logits.to(torch.bfloat16).float()).float(), atol=1e-5, rtol=0)


def test_registry_builds_each_loss_from_its_objective_config_and_explains_bad_input():
    assert set(LOSSES) == {"graded", "mixture", "dpo", "likelihood"}
    assert isinstance(build_loss(GradedObjective("g", grade=0.5), 0.2), GradedLoss)
    assert isinstance(build_loss(DpoObjective("d"), 0.1), DPOLoss) and build_loss(DpoObjective("d"), 0.1).grade == 1.0
    assert build_loss(LikelihoodObjective("l"), 0.1).grade == 0.0
    assert build_loss(MixtureObjective("m", lam=0.25), 0.1).lam == 0.25
    assert build_loss(GradedObjective("g", grade=1.5), 0.1).grade == 1.5  # outside [0, 1] is allowed (documented)

    with pytest.raises(ValueError, match="loss 'trl' is not trained by our preference loop"):
        build_loss(TrlObjective("t"), 0.1)
    with pytest.raises(ValueError, match="beta must be"):
        build_loss(DpoObjective("d"), 0.0)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        build_loss(MixtureObjective("m", lam=1.5), 0.1)
    with pytest.raises(ValueError, match="grade must be a finite"):
        build_loss(GradedObjective("g", grade=math.inf), 0.1)


def test_objectives_are_checked_together_naming_the_bad_one():
    good = [TrlObjective("dpo"), GradedObjective("g0", grade=0.0), MixtureObjective("mix", lam=0.5)]
    check_objectives(good, 0.1)
    with pytest.raises(ValueError, match=r"align.objectives\[1\] \(mix\): lam must be in"):
        check_objectives([good[0], MixtureObjective("mix", lam=2.0)], 0.1)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        check_objectives([TrlObjective("dpo")], -1.0)  # beta is checked even when only TRL uses it


    x = random_logps()
    with pytest.raises(ValueError, match="five \\(B,\\) tensors"):
        GradedLoss(1.0)(**dict(x, ref_rejected_logps=x["ref_rejected_logps"][:2]))
    with pytest.raises(ValueError, match="chosen_token_counts sums to 0"):
        MixtureLoss(0.5)(**dict(x, chosen_token_counts=torch.zeros(5, dtype=torch.long)))
