"""What the rank-1 interventions need from the model: one statistics pass and held-out evaluation.

Statistics pass (:func:`measure_statistics`), at the base weights, over the *training* pairs: the
sigmoid-DPO loss with the reference equal to the policy (so ``D_w = D_l = 0``), a mean over pairs,
back-propagated batch by batch (each batch's mean loss weighted by its share of the pairs). During
that same backward the :class:`weightgeom.hooks.covariance.CovarianceInstrument` accumulates ``C_a`` (per input
group) and ``C_delta`` (per role) with ``loss_normalizer = P`` (the number of pairs), so

    G       = (1/P) sum_p sum_{t in p} delta_t a_t^T         (the autograd gradient, out x in)
    C_a     = (1/N) sum_t a_t a_t^T                           (N non-padding tokens, prompts included)
    C_delta = (1/N) sum_t delta_t delta_t^T,  delta_t = d l_p / d y_t   (per-pair scale)

all from one consistent pass. Two further gradients (no covariances) are taken for the predictions
next to the held-out measurements: the DPO gradient on the held-out pairs and the CE gradient on
the held-out text.

Held-out evaluation (:func:`evaluate`): sigmoid-DPO loss, reward margin, rewards and preference
accuracy on the held-out pairs against the base model as reference (``weightgeom.trainers.preference``), and
the per-token CE of the held-out text blocks and ``KL(base || edited)`` of their next-token
distributions (mean over predicted tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightgeom.hooks import keys
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.roles import TrackedMatrix
from weightgeom.trainers.ce import lm_loss_sum
from weightgeom.trainers.losses import DPOLoss
from weightgeom.trainers.pairs import pair_logps, preference_eval, reference_logps

PREF_KEYS = {"eval/pref_loss": "dpo_loss", "eval/pref_margin": "margin", "eval/pref_reward_chosen": "reward_chosen",
             "eval/pref_reward_rejected": "reward_rejected", "eval/pref_accuracy": "accuracy"}


@dataclass
class Statistics:
    """One consistent statistics pass at the base weights (float64 tensors on the model's device).

    ``G``, ``G_heldout``, ``G_ce``: ``"L{i}/{role}"`` -> (out, in) gradients of the training-pair DPO
    loss, the held-out-pair DPO loss and the held-out-text CE (mean per predicted token).
    ``C_a``: ``"L{i}/{group}"`` -> (n, n); ``C_delta``: ``"L{i}/{role}"`` -> (m, m), per-pair scale.
    ``tokens``: ``"L{i}/{role}"`` -> N, tokens counted for that role's ``C_delta`` (= its ``C_a``'s).
    ``n_pairs``: P, the training pairs.
    """

    G: dict[str, Tensor]
    G_heldout: dict[str, Tensor]
    G_ce: dict[str, Tensor]
    C_a: dict[str, Tensor]
    C_delta: dict[str, Tensor]
    tokens: dict[str, int]
    n_pairs: int

    def tokens_per_pair(self, key: str) -> float:
        return self.tokens[key] / self.n_pairs


def dpo_gradient(model: nn.Module, data: dict, tracked: list[TrackedMatrix], beta: float, batch_size: int,
                 device: torch.device, cov: CovarianceInstrument | None = None) -> dict[str, Tensor]:
    """Mean gradient over all pairs of ``data`` of the sigmoid DPO loss at policy = reference.

    The reference log-probs are the policy's own, detached, so every ``D`` is exactly 0 and the
    gradient is ``-beta/2 * grad(D_w - D_l)`` averaged over pairs. With ``cov`` attached, its
    ``loss_normalizer`` is set to the number of pairs (per-pair ``delta``)."""
    n = len(data["chosen_input_ids"])
    loss_fn = DPOLoss(beta)
    if cov is not None:
        cov.loss_normalizer = float(n)
    model.zero_grad(set_to_none=True)
    try:
        for idx in torch.arange(n).split(batch_size):
            chosen, rejected, counts = pair_logps(model, data, idx, device)
            out = loss_fn(chosen, rejected, chosen.detach(), rejected.detach(), counts)
            (out.loss * len(idx) / n).backward()
        return _grads(tracked)
    finally:
        model.zero_grad(set_to_none=True)


def ce_gradient(model: nn.Module, blocks: Tensor, tracked: list[TrackedMatrix], batch_size: int,
                device: torch.device) -> dict[str, Tensor]:
    """Gradient of the mean per-token CE of the packed ``blocks`` (B, T)."""
    total = blocks.shape[0] * (blocks.shape[1] - 1)
    model.zero_grad(set_to_none=True)
    try:
        for batch in blocks.split(batch_size):
            loss_sum, _ = lm_loss_sum(model, batch.to(device))
            (loss_sum / total).backward()
        return _grads(tracked)
    finally:
        model.zero_grad(set_to_none=True)


def _grads(tracked: list[TrackedMatrix]) -> dict[str, Tensor]:
    out = {}
    for tm in tracked:
        g = tm.grad()
        if g is None:
            raise ValueError(f"{tm.key} received no gradient: its weight is frozen (requires_grad=False) or unused")
        out[tm.key] = g.double()
    return out


def measure_statistics(model: nn.Module, tracked: list[TrackedMatrix], *, train_data: dict, heldout_data: dict,
                       text_blocks: Tensor, beta: float, batch_size: int, device: torch.device) -> Statistics:
    """``G``, ``C_a``, ``C_delta`` from one pass over the training pairs; held-out DPO and CE gradients.

    ``tracked``: every (layer, role) whose statistics are wanted (C_a of each role's input group,
    C_delta of each role's output, G of each). Uses the instruments' own hooks, so padding is
    excluded and fused roles get their rows."""
    roles = tuple(sorted({tm.role for tm in tracked}))
    cov = CovarianceInstrument(tracked, input_roles=roles, output_roles=roles)  # fp32 sums, as in training
    cov.attach(model)
    try:
        G = dpo_gradient(model, train_data, tracked, beta, batch_size, device, cov)
    finally:
        cov.detach()  # hooks removed also when the pass raises
    state = cov.state_dict()
    C_a = {key: cov.covariance_in(key, state=state).to(device) for key in cov.sums_in}
    C_delta = {key: cov.covariance_out(key, state=state).to(device) for key in cov.sums_out}
    tokens = {key: int(state[keys.state_key(keys.COV_OUT, key, "count")]) for key in cov.sums_out}
    missing = sorted({tm.group_key for tm in tracked} - set(C_a)) + sorted({tm.key for tm in tracked} - set(C_delta))
    if missing:
        raise ValueError(f"the statistics pass saw no tokens for {missing[:4]}: is backward reaching these modules?")
    G_heldout = dpo_gradient(model, heldout_data, tracked, beta, batch_size, device)
    G_ce = ce_gradient(model, text_blocks, tracked, batch_size, device)
    n_pairs = len(train_data["chosen_input_ids"])
    return Statistics(G, G_heldout, G_ce, C_a, C_delta, tokens, n_pairs)


# ----- held-out evaluation ---------------------------------------------------------------------------

@dataclass
class HeldOut:
    """Held-out data with the base model's reference values, for :func:`evaluate`."""

    pair_data: dict
    ref: tuple[Tensor, Tensor]
    text_blocks: Tensor
    base_logprobs: list[Tensor]  # per text batch: (b, T-1, V) log-probs of the base model, float32
    beta: float
    batch_size: int
    device: torch.device


@torch.no_grad()
def prepare_heldout(model: nn.Module, pair_data: dict, text_blocks: Tensor, *, beta: float, batch_size: int,
                    device: torch.device) -> HeldOut:
    """Reference log-probs of the held-out pairs and base next-token log-probs of the held-out text.
    Memory: ``blocks * (T - 1) * vocab`` floats for the latter, on ``device``."""
    ref = reference_logps(model, pair_data, batch_size, device)
    base = [_next_token_logprobs(model, batch.to(device)) for batch in text_blocks.split(batch_size)]
    return HeldOut(pair_data, ref, text_blocks, base, beta, batch_size, device)


def _next_token_logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        model.train(was_training)
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def evaluate(model: nn.Module, held: HeldOut) -> dict[str, float]:
    """Held-out metrics of the model as it is now: ``dpo_loss``, ``margin``, ``reward_chosen``,
    ``reward_rejected``, ``accuracy`` (implicit rewards vs the base reference; TRL's definitions),
    ``ce`` (mean per predicted token) and ``kl`` = KL(base || current), mean per predicted token."""
    pref = preference_eval(model, held.pair_data, held.ref, DPOLoss(held.beta), held.batch_size, held.device)
    out = {short: float(pref[key]) for key, short in PREF_KEYS.items()}
    ce_sum = kl_sum = 0.0
    count = 0
    for batch, base in zip(held.text_blocks.split(held.batch_size), held.base_logprobs):
        ids = batch.to(held.device)
        logp = _next_token_logprobs(model, ids)
        targets = ids[:, 1:].unsqueeze(-1)
        ce_sum -= float(logp.gather(-1, targets).double().sum())
        kl_sum += float((base.exp() * (base - logp)).double().sum())
        count += targets.numel()
    out["ce"] = ce_sum / count
    out["kl"] = kl_sum / count
    return out
