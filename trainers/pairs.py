"""Preference pairs through a model: summed completion log-probs, the reference pass, and held-out
preference metrics. Shared by our preference loop and the TRL adapter (both report ``eval/pref_*``)."""

from __future__ import annotations

import torch

from weightgeom.trainers.losses import PreferenceLoss, sequence_logps


def pair_logps(model, data: dict, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected for pairs ``idx`` (one forward of 2B rows),
    and the chosen completions' token counts; each (B,). ``data`` is :func:`weightgeom.core.data.tokenize_pairs`'s."""
    ids = torch.cat([data["chosen_input_ids"][idx], data["rejected_input_ids"][idx]]).to(device)
    mask = torch.cat([data["chosen_attention_mask"][idx], data["rejected_attention_mask"][idx]]).to(device)
    loss_mask = torch.cat([data["chosen_loss_mask"][idx], data["rejected_loss_mask"][idx]]).to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps, counts = sequence_logps(logits.float(), ids, loss_mask)
    b = len(idx)
    return logps[:b], logps[b:], counts[:b]


@torch.no_grad()
def reference_logps(model, data: dict, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs (n_pairs,) of every pair under ``model`` in eval mode, on the CPU:
    the DPO reference, computed once instead of keeping a second model in memory."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for idx in torch.arange(len(data["chosen_input_ids"])).split(batch_size):
        c, r, _ = pair_logps(model, data, idx, device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def preference_eval(model, data: dict, ref: tuple, loss_fn: PreferenceLoss, batch_size: int,
                    device) -> dict[str, float]:
    """Preference metrics of the current policy on held-out pairs (``eval/pref_*`` keys)."""
    was_training = model.training
    model.eval()
    parts = [pair_logps(model, data, idx, device) for idx in torch.arange(len(ref[0])).split(batch_size)]
    model.train(was_training)
    c, r, n = (torch.cat([p[i].cpu() for p in parts]) for i in range(3))
    out = loss_fn(c, r, ref[0], ref[1], n)
    return {k.replace("pref/", "eval/pref_"): v for k, v in out.metrics.items()}
