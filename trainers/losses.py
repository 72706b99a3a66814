"""Preference losses: the graded contrastive family, as a small registry of loss objects.

Every loss takes, for a batch of B preference pairs, summed completion log-probs (shape (B,))

    policy_chosen_logps, policy_rejected_logps   under the policy being trained
    ref_chosen_logps, ref_rejected_logps         under the frozen reference
    chosen_token_counts                          completion tokens of each chosen sequence

and works with the implicit-reward log-ratios ``D_w = policy_chosen - ref_chosen`` and
``D_l = policy_rejected - ref_rejected``:

    graded      L_g = -log sigmoid(beta * (D_w - g * D_l)), mean over pairs
                g = 1 is sigmoid DPO; g = 0 only raises the chosen likelihood (relative to the reference)
    dpo         graded with g = 1
    likelihood  graded with g = 0
    mixture     lam * CE(chosen) + (1 - lam) * DPO

All are means over pairs, so a trainer that accumulates gradients over micro-batches weights each
micro-batch's loss by its share of the step's pairs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossOutput:
    """``loss``: scalar to backpropagate; ``values``: the ``pref/*`` statistics (see
    :func:`preference_metrics`) as detached 0-d tensors on the loss's device, read by nobody until
    needed (a training loop sums them over micro-batches on the device); ``metrics``: the same as floats."""

    loss: Tensor
    values: dict[str, Tensor]

    @property
    def metrics(self) -> dict[str, float]:
        return host_floats(self.values)


def host_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """``{name: 0-d tensor}`` as Python floats, in one read-back from the device (one host sync)."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.detach().double() for v in values.values()]).tolist()))


# ----- pure functions --------------------------------------------------------------------------------

def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token log-probs of the masked tokens of each sequence.

    Args:
        logits: (B, T, V) model outputs; position t holds the distribution of token t + 1.
        input_ids: (B, T) token ids.
        loss_mask: (B, T), 1 on the tokens to score (completion tokens), aligned with ``input_ids``.

    Returns:
        ``(logps, counts)``, both (B,): ``logps[b] = sum_{t>=1, mask[b,t]=1} log p(ids[b,t] | ids[b,<t])``
        (float32 or wider: half-precision logits are scored in float32) and the number of scored tokens
        (long). Token t is predicted from position t - 1, so ``loss_mask[:, 0]`` is ignored: the first
        token has no prediction.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if input_ids.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} must both be "
                         f"(batch, seq) = {tuple(logits.shape[:2])} to match logits")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mask = loss_mask[:, 1:].bool()
    # Every position as it is (no shifted copy of the logits): position t's target is token t + 1; the
    # last position predicts nothing (target 0, masked out like every unscored position).
    targets = F.pad(input_ids[:, 1:], (0, 1))
    token = TokenLogps.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
    return token.masked_fill(~F.pad(mask, (0, 1), value=False), 0.0).sum(-1), mask.sum(-1)


class TokenLogps(torch.autograd.Function):
    """``log softmax(logits)[target]`` of each row of (N, V) logits, as ``gather - logsumexp``: the
    values and gradients of that autograd expression, bit for bit, with a backward that writes one
    (N, V) buffer, ``g * (onehot(target) - softmax)``, where autograd's takes five passes and buffers
    (about 3.5x faster on a CPU at SmolLM2's vocabulary, benchmarks/README.md). A fused
    ``F.cross_entropy`` is as fast but not as exact: on a CPU its log-softmax is off by about +3e-6
    per token at a 49k vocabulary, always the same way, so sums over sequences drift by 1e-4."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = logits.logsumexp(-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        out = logits.sub(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        return out.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1)), None


def graded_loss(d_w: Tensor, d_l: Tensor, grade: float, beta: float) -> Tensor:
    """``mean_b -log sigmoid(beta * (D_w - grade * D_l))`` over pairs; ``d_w``, ``d_l`` are (B,)."""
    return -F.logsigmoid(beta * (d_w - grade * d_l)).mean()


def chosen_nll(policy_chosen_logps: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen completions of the batch:
    ``-sum_b logps_b / sum_b counts_b``. Token-weighted (a long completion counts more than a short
    one), which is the normalisation of CE pretraining, so ``lam = 1`` is exactly SFT on the chosen
    completions. Under gradient accumulation, per-micro-batch token means weighted by pair share
    differ slightly from one token mean over the step when micro-batches hold different token counts.
    """
    total = chosen_token_counts.sum()
    if total <= 0:
        raise ValueError("chosen_token_counts sums to 0: no chosen completion token to score (check the loss mask)")
    return -policy_chosen_logps.sum() / total


@torch.no_grad()
def preference_metrics(d_w: Tensor, d_l: Tensor, beta: float, loss: Tensor) -> dict[str, Tensor]:
    """Implicit-reward statistics, named and defined as TRL logs them (``rewards/*``):
    rewards ``beta * D``, margin their difference, accuracy the fraction with ``D_w > D_l``.
    0-d tensors on the inputs' device (:func:`host_floats` reads them)."""
    chosen, rejected = beta * d_w, beta * d_l
    return {
        "pref/loss": loss.detach(),
        "pref/reward_chosen": chosen.mean(),
        "pref/reward_rejected": rejected.mean(),
        "pref/margin": (chosen - rejected).mean(),
        "pref/accuracy": (chosen > rejected).float().mean(),
    }


# ----- loss objects ----------------------------------------------------------------------------------

class PreferenceLoss(ABC):
    """Base: validates inputs, forms ``D_w`` and ``D_l``, attaches the metrics. Subclasses define
    :meth:`objective`."""

    def __init__(self, beta: float = 0.1) -> None:
        check_beta(beta)
        self.beta = float(beta)

    def __call__(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, chosen_token_counts: Tensor) -> LossOutput:
        inputs = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                  "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
                  "chosen_token_counts": chosen_token_counts}
        shapes = {name: tuple(t.shape) for name, t in inputs.items()}
        if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1 or len(policy_chosen_logps) == 0:
            raise ValueError(f"{type(self).__name__} expects five (B,) tensors with B >= 1, got shapes {shapes}")
        d_w = policy_chosen_logps - ref_chosen_logps
        d_l = policy_rejected_logps - ref_rejected_logps
        loss = self.objective(d_w, d_l, policy_chosen_logps, chosen_token_counts)
        return LossOutput(loss, preference_metrics(d_w, d_l, self.beta, loss))

    @abstractmethod
    def objective(self, d_w: Tensor, d_l: Tensor, policy_chosen_logps: Tensor, chosen_token_counts: Tensor) -> Tensor:
        """Scalar loss from the log-ratios (B,) and, for objectives with a likelihood term, the chosen log-probs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class GradedLoss(PreferenceLoss):
    """``L_g = -log sigmoid(beta * (D_w - g * D_l))``: interpolates from chosen-only likelihood
    (g = 0; the gradient w.r.t. the rejected log-probs is exactly zero) to DPO (g = 1).

    Any finite real ``grade`` is accepted: g > 1 over-weights pushing the rejected completion down,
    g < 0 rewards raising it; neither is part of the paper's [0, 1] control but both are well defined.
    """

    def __init__(self, grade: float, beta: float = 0.1) -> None:
        super().__init__(beta)
        if not math.isfinite(grade):
            raise ValueError(f"grade must be a finite number (0 = chosen likelihood, 1 = DPO), got {grade}")
        self.grade = float(grade)

    def objective(self, d_w, d_l, policy_chosen_logps, chosen_token_counts):
        return graded_loss(d_w, d_l, self.grade, self.beta)


class DPOLoss(GradedLoss):
    """Sigmoid DPO: the graded loss at g = 1 (TRL's ``loss_type="sigmoid"``)."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(grade=1.0, beta=beta)


class LikelihoodLoss(GradedLoss):
    """The graded loss at g = 0: ``-log sigmoid(beta * D_w)``, which depends on the chosen completion only."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(grade=0.0, beta=beta)


class MixtureLoss(PreferenceLoss):
    """``lam * CE(chosen) + (1 - lam) * DPO``, CE = per-token NLL of the chosen completions
    (:func:`chosen_nll`). ``lam = 1`` is SFT on the chosen completions, ``lam = 0`` is DPO.
    Scale caveat: CE is per token while DPO is per pair, so equal ``lam`` is not equal gradient share.
    """

    def __init__(self, lam: float, beta: float = 0.1) -> None:
        super().__init__(beta)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1] (1 = CE on chosen only, 0 = DPO only), got {lam}")
        self.lam = float(lam)

    def objective(self, d_w, d_l, policy_chosen_logps, chosen_token_counts):
        ce = chosen_nll(policy_chosen_logps, chosen_token_counts)
        return self.lam * ce + (1.0 - self.lam) * graded_loss(d_w, d_l, 1.0, self.beta)


def check_beta(beta: float) -> None:
    """``beta`` (the DPO temperature, ``align.beta``) must be a finite number > 0."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")


# Each objective config (weightgeom.core.config.OBJECTIVES) -> its loss. ``loss: trl`` objectives are trained by
# TRL (trainers/trl_dpo.py), which reports their held-out metrics with sigmoid DPO.
LOSSES: dict[str, Callable[..., PreferenceLoss]] = {
    "graded": lambda objective, beta: GradedLoss(objective.grade, beta),
    "dpo": lambda objective, beta: DPOLoss(beta),
    "likelihood": lambda objective, beta: LikelihoodLoss(beta),
    "mixture": lambda objective, beta: MixtureLoss(objective.lam, beta),
}


def build_loss(objective, beta: float) -> PreferenceLoss:
    """The loss of an objective config (``weightgeom.core.config.GradedObjective``, ``MixtureObjective``, ...);
    its parameters are checked here, by the loss that uses them."""
    if objective.loss not in LOSSES:
        raise ValueError(f"objective {objective.name!r}: loss {objective.loss!r} is not trained by our preference "
                         f"loop (its losses: {', '.join(LOSSES)}; 'trl' runs through weightgeom.trainers.trl_dpo)")
    return LOSSES[objective.loss](objective, beta)


def check_objectives(objectives: list, beta: float) -> None:
    """Build every objective's loss once, so a bad setting fails before any training starts;
    a ``ValueError`` names the objective and the setting."""
    check_beta(beta)
    for i, objective in enumerate(objectives):
        if objective.loss not in LOSSES:
            continue
        try:
            build_loss(objective, beta)
        except ValueError as err:
            raise ValueError(f"align.objectives[{i}] ({objective.name}): {err}") from err
