"""Shared by the instrument tests: one instrumented training run on a tiny Llama (3 steps, SGD or
AdamW, padded batches), with every brute-force reference the quantities' tests need: second moments
of the stored inputs and output gradients, the weights before, during and after, and each step's raw
gradient."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import make_model, token_loss_sum
from tests.hooks.brute_force import K, Recorder, batches, kept, layer, second_moment
from weightgeom.hooks.quantities import Quantity
from weightgeom.hooks.roles import ROLES
from weightgeom.hooks.suite import InstrumentSuite

STEPS = 3


@dataclass
class Trained:
    """A trained suite and the references, float64. Watched matrices: L0/q, L1/o, L1/down."""

    suite: InstrumentSuite
    model: torch.nn.Module
    C_a: torch.Tensor  # L0 attn_in, every step
    C_a_step1: torch.Tensor  # L0 attn_in after the first step (the frozen subspace)
    C_o_in: torch.Tensor  # L1 o_in
    C_down_in: torch.Tensor  # L1 down_in
    C_delta: torch.Tensor  # L1 o, per-token deltas at the per-token loss scale
    o_deltas: torch.Tensor  # those deltas, one row per non-padding token (N, 32)
    dW: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    grads: dict[str, list[torch.Tensor]]

    def compute(self, quantity: Quantity) -> dict[str, float]:
        """The metrics of ``quantity`` alone on this run's final state (with their layer means)."""
        self.suite.quantities = (quantity,)
        return self.suite.compute(STEPS)


@pytest.fixture(scope="module", params=["sgd", "adamw"])
def trained(request) -> Trained:
    model = make_model("llama")
    L0, L1 = layer(model, 0), layer(model, 1)
    # the exact path (float32's error: tests/hooks/test_suite.py); every_step keeps the last update and gradient
    # after the loop, so each quantity can be computed on its own below (the lean default, capture="due",
    # takes them inside a due step: tests/hooks/test_lean_state.py); coherence is opt-in
    suite = InstrumentSuite(model, input_roles=ROLES, k=K, every_n=1000, dtype=torch.float64, seed=3,
                            metric_dtype="float64", capture="every_step", coherence=True)
    opt = (torch.optim.SGD(model.parameters(), lr=0.5) if request.param == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    watched = {"q": L0.self_attn.q_proj, "down": L1.mlp.down_proj, "o": L1.self_attn.o_proj}
    start = {name: m.weight.detach().double().clone() for name, m in watched.items()}
    rec = Recorder({"attn_in": L0.self_attn.k_proj, "down_in": L1.mlp.down_proj, "o_in": L1.self_attn.o_proj},
                   deltas={"o": L1.self_attn.o_proj})
    data, norms, grads = batches(STEPS), [], defaultdict(list)
    with suite.attached(model, opt):
        for step, batch in enumerate(data, 1):
            opt.zero_grad()
            loss_sum, n = token_loss_sum(model, batch)
            suite.set_loss_normalizer(n)
            (loss_sum / n).backward()
            norms.append(n)
            for name, m in watched.items():
                grads[name].append(m.weight.grad.detach().double().clone())
            before = {name: m.weight.detach().double().clone() for name, m in watched.items()}
            opt.step()
            suite.after_optimizer_step(step)
            if step == 1:
                C_a_step1 = second_moment(rec.inputs["attn_in"], [data[0]["attention_mask"]])
    rec.remove()
    masks = [b["attention_mask"] for b in data]
    now = {name: m.weight.detach().double() for name, m in watched.items()}
    return Trained(suite=suite, model=model, C_a=second_moment(rec.inputs["attn_in"], masks), C_a_step1=C_a_step1,
                   C_o_in=second_moment(rec.inputs["o_in"], masks),
                   C_down_in=second_moment(rec.inputs["down_in"], masks),
                   C_delta=second_moment([e.grad for e in rec.eps["o"]], masks, scales=norms),
                   o_deltas=torch.cat([kept(e.grad, mk) * s for e, mk, s in zip(rec.eps["o"], masks, norms)]),
                   dW={name: now[name] - start[name] for name in watched},
                   update={name: now[name] - before[name] for name in watched}, grads=dict(grads))
