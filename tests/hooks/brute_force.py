"""Brute-force references for the instruments, independent of the suite's hooks.

Plain forward hooks store each watched module's input, and add a zero leaf ``eps`` (requires_grad) to
its output, whose ``.grad`` after backward is the per-token ``delta = dL/dy``. Second moments are then
plain float64 products over the non-padding tokens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from tests.conftest import make_batch, token_loss_sum
from weightgeom.hooks.roles import ROLES
from weightgeom.hooks.suite import InstrumentSuite

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


@dataclass
class Exactness:
    """One instrumented SGD step on ``batch`` against the float64 brute force: the largest absolute and
    relative (to the reference's largest entry) difference of each statistic over every tracked matrix."""

    suite: object
    metrics: dict
    dW: dict  # key -> brute-force weight change, float64 (out, in), fused rows cut by the test's own slices
    errors: dict  # "C_a" / "C_delta" / "dW" -> (max abs, max rel)
    counts: dict  # group or role key -> tokens counted by the instruments


def check_exact_step(model, batch, rows_of=None, lr: float = 0.5, **suite_options) -> Exactness:
    """Attach an ``InstrumentSuite`` measuring every role on both sides (float64), take one SGD step on the
    CE loss of ``batch``, and compare ``C_a`` (per input group), ``C_delta`` (per role) and the weight
    delta with per-token inputs and output gradients captured by plain hooks (:class:`Recorder`).
    ``rows_of(tm)``: the output rows of a fused matrix as the test derives them (default ``tm.rows``)."""
    rows_of = rows_of or (lambda tm: tm.rows)
    suite = InstrumentSuite(model, input_roles=ROLES, output_roles=ROLES, k=K, every_n=1000, dtype=torch.float64,
                            metric_dtype="float64", **suite_options)
    modules = {}
    for tm in suite.tracked:  # one hook per module, however many roles it computes (fused)
        modules.setdefault(tm.module, f"m{len(modules)}")
    by_name = {name: module for module, name in modules.items()}
    before = {name: m.weight.detach().double().clone() for name, m in by_name.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with suite.attached(model, opt):
        rec = Recorder(by_name, deltas=by_name)
        opt.zero_grad()
        loss_sum, n = token_loss_sum(model, batch)
        suite.set_loss_normalizer(n)
        (loss_sum / n).backward()
        rec.remove()
        opt.step()
        metrics = suite.after_optimizer_step(1, force=True)
    mask = [batch["attention_mask"]]
    errors = defaultdict(lambda: (0.0, 0.0))
    dW, counts = {}, {}

    def record(kind, got, expected):
        scale = float(expected.abs().max())
        diff = float((got - expected).abs().max())
        old = errors[kind]
        errors[kind] = (max(old[0], diff), max(old[1], diff / scale if scale else diff))

    for key in suite.cov.sums_in:
        tm = next(t for t in suite.tracked if t.group_key == key)
        record("C_a", suite.cov.covariance_in(key), second_moment(rec.inputs[modules[tm.module]], mask))
        counts[key] = suite.cov.sums_in[key][2]
    for tm in suite.tracked:
        name, rows = modules[tm.module], rows_of(tm)
        grads = [e.grad if rows is None else e.grad[..., rows] for e in rec.eps[name]]
        record("C_delta", suite.cov.covariance_out(tm.key), second_moment(grads, mask, scales=[n]))
        counts[tm.key] = suite.cov.sums_out[tm.key][1]
        change = tm.module.weight.detach().double() - before[name]
        change = change.T if tm.transposed else change
        dW[tm.key] = change if rows is None else change[rows]
        record("dW", suite.upd.delta(tm).double(), dW[tm.key])
    return Exactness(suite, metrics, dW, dict(errors), counts)
