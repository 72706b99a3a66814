"""Brute-force references for the instruments, independent of the suite's hooks.

Plain forward hooks store each watched module's input, and add a zero leaf ``eps`` (requires_grad) to
its output, whose ``.grad`` after backward is the per-token ``delta = dL/dy``. Second moments are then
plain float64 products over the non-padding tokens.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tests.conftest import make_batch, token_loss_sum

K = 4  # suite subspace dimension in these tests (the tiny llama has d_model 32, d_ff 64)
REL = 1e-5


class Recorder:
    """Plain forward hooks: ``inputs[name]`` gets each forward's input (B, T, n); for names in
    ``deltas`` the output gets ``+ eps`` (exactly zero, so values are unchanged) and ``eps[name]``
    keeps the leaf whose gradient is ``dL/dy``."""

    def __init__(self, inputs: dict, deltas: dict | None = None):
        self.inputs: dict[str, list] = defaultdict(list)
        self.eps: dict[str, list] = defaultdict(list)
        self.handles = [m.register_forward_hook(self._store(name)) for name, m in inputs.items()]
        self.handles += [m.register_forward_hook(self._perturb(name)) for name, m in (deltas or {}).items()]

    def _store(self, name):
        def hook(module, args, out):
            self.inputs[name].append(args[0].detach().clone())
        return hook

    def _perturb(self, name):
        def hook(module, args, out):
            eps = torch.zeros_like(out, requires_grad=True)
            self.eps[name].append(eps)
            return out + eps
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def kept(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of (B, T, n) ``x`` at non-padding tokens, float64 (N, n)."""
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1) == 1].double()


def second_moment(xs: list[torch.Tensor], masks: list[torch.Tensor], scales=None) -> torch.Tensor:
    """(1/N) sum x x^T over the non-padding tokens of every stored forward."""
    rows = [kept(x, m) * (1.0 if scales is None else s) for x, m, s in zip(xs, masks, scales or [None] * len(xs))]
    X = torch.cat(rows)
    return X.T @ X / X.shape[0]


def step_once(model, opt, suite, batch, step, force=False):
    opt.zero_grad()
    loss_sum, n = token_loss_sum(model, batch)
    suite.set_loss_normalizer(n)
    (loss_sum / n).backward()
    opt.step()
    return suite.after_optimizer_step(step, force=force)


def batches(n: int):
    return [make_batch(seed=s) for s in range(1, n + 1)]


def layer(model, i):
    return model.model.layers[i]
