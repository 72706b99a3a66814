"""Preference pairs through a model: summed completion log-probs, the reference pass, and held-out
preference metrics. Shared by our preference loop and the TRL adapter (both report ``eval/pref_*``).

A batch's forward is only as wide as it needs to be (measured on SmolLM2-135M, benchmarks/README.md):

- :func:`weightgeom.core.data.tokenize_pairs` pads every pair to the longest sequence of the whole set;
  each batch is cut to its own longest row first (right padding: nothing real is cut, and no real
  token attends to a pad to its right, so the log-probs are those of the full width).
- Only the positions that predict a completion token need logits: the forward is asked for the last
  ``T - s`` positions (``logits_to_keep``, s = the batch's first predicting position), so neither the
  (2B, T, vocab) logits nor their log-softmax exist for the prompts. A model class whose forward has
  no ``logits_to_keep`` gets the full logits, cut to the same window.
"""

from __future__ import annotations

import functools
import inspect

import torch

from weightgeom.hooks.roles import unwrap_model
from weightgeom.trainers.losses import PreferenceLoss, sequence_logps


def pair_logps(model, data: dict, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected for pairs ``idx`` (one forward of 2B rows),
    and the chosen completions' token counts; each (B,). ``data`` is :func:`weightgeom.core.data.tokenize_pairs`'s
    (kept on the CPU: the batch's window is read from it there, without a device sync)."""
    ids, mask, loss_mask = (torch.cat([data[f"chosen_{k}"][idx], data[f"rejected_{k}"][idx]])
                            for k in ("input_ids", "attention_mask", "loss_mask"))
    width, keep = batch_window(mask, loss_mask)
    ids, mask, loss_mask = (t[:, :width].to(device) for t in (ids, mask, loss_mask))
    logits = completion_logits(model, ids, mask, keep)
    logps, counts = sequence_logps(logits, ids[:, width - keep:], loss_mask[:, width - keep:])
    b = len(idx)
    return logps[:b], logps[b:], counts[:b]


def batch_window(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> tuple[int, int]:
    """``(width, keep)`` of a batch of rows (R, T), from its masks (host ints): ``width`` = one past its
    last attended column, the columns to forward; ``keep`` = how many of the last positions of that
    width predict a scored token: position t predicts token t + 1, so ``keep = width - s`` for the
    batch's first scored token s + 1 (``loss_mask[:, 0]`` is never scored), the whole width when none is."""
    attended = attention_mask.bool().any(0).nonzero()
    width = int(attended[-1]) + 1 if len(attended) else attention_mask.shape[1]
    scored = loss_mask[:, 1:width].bool().any(0).nonzero()
    keep = width - int(scored[0]) if len(scored) else width  # scored[0] + 1 is the token; s = scored[0]
    return width, keep


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits (R, keep, V) of the last ``keep`` positions: through the forward's ``logits_to_keep``
    where the model's class has it (PEFT, DDP and FSDP wrappers pass it on), else sliced from the full logits."""
    width = input_ids.shape[1]
    if keep < width and takes_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, logits.shape[1] - keep:]


def takes_logits_to_keep(model) -> bool:
    """Whether the forward of the transformers model under ``model``'s wrappers has a ``logits_to_keep``
    argument (every causal LM of the role table does in transformers 5: llama, gpt2, gpt_neox, ...)."""
    return _forward_has(type(unwrap_model(model)), "logits_to_keep")


@functools.cache
def _forward_has(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False


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
