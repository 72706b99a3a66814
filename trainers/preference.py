"""Preference alignment from one checkpoint, instrumented: the graded contrastive family in our own
loop (DPO through TRL's DPOTrainer lives in trainers/trl_dpo.py).

Our loop, top to bottom:

    load the policy from the checkpoint (optionally wrap it in LoRA)
    reference log-probs: one no-grad pass of the *initial* policy over every pair, stored
        (exactly the reference DPO uses, without a second model in memory)
    for each optimizer step:
        draw the step's pairs; forward chosen and rejected together; summed completion log-probs
        loss from the registry (trainers/losses.py): graded L_g, mixture, dpo, likelihood
        backward, clip, optimizer step, schedule; stream preference + geometry metrics

Loss scaling: preference losses are means over pairs, so the instruments' normaliser is the number
of pairs in the step: ``C_delta`` then holds per-pair gradients (each token's ``delta`` is the
gradient of its pair's loss). Relative RSF and spikiness are scale-free, so comparisons with the
per-token CE statistics are unaffected by this choice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from weightgeom.core.config import RunConfig
from weightgeom.core.data import batch_indices, tokenize_pairs
from weightgeom.core.models import apply_lora, build_model
from weightgeom.core.processes import process_state
from weightgeom.trainers.losses import build_loss, host_floats
from weightgeom.trainers.pairs import pair_logps, preference_eval, reference_logps
from weightgeom.trainers.session import RunResult, TrainingSession


def align(cfg: RunConfig, objective, init_dir: Path, run_dir: Path, *, tokenizer, pairs: list[dict],
          eval_pairs: list[dict], progress: bool = True, overwrite: bool = False,
          resume: Path | None = None) -> RunResult:
    """Align the checkpoint ``init_dir`` with ``objective`` (a graded, dpo, likelihood or mixture
    objective config); write a run directory like pretraining's.

    ``resume``: a checkpoint of this run (``align.train.save_every``); training continues from it
    exactly (weights or LoRA adapters, optimizer, schedule, instrument sums). The reference is
    always the policy at ``init_dir``.
    """
    t, a = cfg.align.train, cfg.align
    torch.manual_seed(cfg.seed)
    loss_fn = build_loss(objective, a.beta)
    model = build_model(cfg.model, len(tokenizer), cfg.seed, init_from=str(init_dir))
    if a.lora is not None:
        model = apply_lora(model, a.lora)
    data = tokenize_pairs(pairs, tokenizer, a.max_len)
    eval_data = tokenize_pairs(eval_pairs, tokenizer, a.max_len) if eval_pairs else None
    # The reference is the initial policy, also on resume: computed before the resumed weights load and
    # before the session shards the model (train.fsdp); each process computes it for every pair.
    device = process_state().device
    ref = reference_logps(model.to(device), data, t.batch_size, device)
    eval_ref = reference_logps(model, eval_data, t.batch_size, device) if eval_data else None
    if resume is not None:
        load_policy_weights(model, resume)
    session = TrainingSession(cfg, t, run_dir, phase=f"align/{objective.name}", model=model, tokenizer=tokenizer,
                              resume=resume, overwrite=overwrite, progress=progress)
    per_step = t.batch_size * t.grad_accum  # global pairs per optimizer step
    with session:
        for step in session.steps():
            idx = batch_indices(len(ref[0]), per_step, step - 1, cfg.seed)
            session.suite.set_loss_normalizer(len(idx) / session.world)  # pair-mean loss, * world per process
            metrics: dict[str, torch.Tensor] = {}  # on the device until a row is logged
            for micro in idx.chunk(t.grad_accum):
                mine = micro[session.rank::session.world]
                with session.autocast():
                    c, r, n = pair_logps(session.model, data, mine, session.device)
                out = loss_fn(c, r, ref[0][mine].to(session.device), ref[1][mine].to(session.device), n)
                session.backward(out.loss * len(mine) * session.world / len(idx))
                for k, v in out.values.items():  # pair-weighted means, summed over processes below
                    metrics[k] = metrics.get(k, 0.0) + v.double() * len(mine) / len(idx)
            grad_norm, geometry = session.optimizer_step(step)
            row = {}
            if session.log_due(step) or geometry:
                row = {**session.reduce_sum(host_floats(metrics)), "train/lr": session.lr, "train/grad_norm": grad_norm}
            if eval_data is not None and session.eval_due(step):
                row.update(preference_eval(session.model, eval_data, eval_ref, loss_fn, t.batch_size, session.device))
            session.end_step(step, {**row, **(geometry or {})})
    session.files.record(pairs_seen=t.steps * per_step, n_eval_pairs=len(eval_pairs))
    return session.result


def load_policy_weights(model, checkpoint: Path) -> None:
    """Weights of a mid-run checkpoint: LoRA adapters (``adapter_model.safetensors``, saved by a
    PeftModel) or the full model (``model.safetensors``)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict  # noqa: PLC0415 (peft loads only for LoRA runs)

        if not hasattr(model, "peft_config"):
            raise ValueError(f"{checkpoint} holds LoRA adapters, but this recipe has no align.lora")
        set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
        return
    if not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} has neither model.safetensors nor adapter_model.safetensors")
    if hasattr(model, "peft_config"):
        raise ValueError(f"{checkpoint} holds full weights, but this recipe wraps the policy in LoRA (align.lora)")
    missing, unexpected = model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{checkpoint}/model.safetensors does not fit this model: missing {missing}, "
                         f"unexpected {unexpected}")
