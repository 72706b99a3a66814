"""Preference alignment from one checkpoint, instrumented: the graded contrastive family (our loop)
and DPO through TRL's DPOTrainer.

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

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.build import build_model, build_suite
from harness.checkpoint import (checkpoint_dir, load_instruments, load_trainer_state, save_checkpoint,
                                set_rng_state)
from harness.config import ObjectiveConfig, RunConfig
from harness.data import batch_indices, tokenize_pairs
from harness.rundir import prepare_run_dir
from harness.sinks import build_sinks, truncate_after
from trainers.losses import build_loss, sequence_logps
from trainers.optim import make_optimizer, make_scheduler


@dataclass
class AlignResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict


def apply_lora(model, lora_cfg):
    import peft  # noqa: PLC0415

    config = peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                             target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def pair_logps(model, data: dict, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected for pairs ``idx`` (one forward of 2B rows)."""
    ids = torch.cat([data["chosen_input_ids"][idx], data["rejected_input_ids"][idx]]).to(device)
    mask = torch.cat([data["chosen_attention_mask"][idx], data["rejected_attention_mask"][idx]]).to(device)
    loss_mask = torch.cat([data["chosen_loss_mask"][idx], data["rejected_loss_mask"][idx]]).to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps, counts = sequence_logps(logits.float(), ids, loss_mask)
    b = len(idx)
    return logps[:b], logps[b:], counts[:b]


@torch.no_grad()
def reference_logps(model, data: dict, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
def preference_eval(model, data: dict, ref: tuple, loss_fn, batch_size: int, device) -> dict[str, float]:
    """Preference metrics of the current policy on held-out pairs (``eval/`` keys)."""
    was_training = model.training
    model.eval()
    parts = [pair_logps(model, data, idx, device) for idx in torch.arange(len(ref[0])).split(batch_size)]
    model.train(was_training)
    c, r, n = (torch.cat([p[i].cpu() for p in parts]) for i in range(3))
    out = loss_fn(c, r, ref[0], ref[1], n)
    return {k.replace("pref/", "eval/pref_"): v for k, v in out.metrics.items()}


def align(cfg: RunConfig, objective: ObjectiveConfig, init_dir: Path, run_dir: Path, *, tokenizer,
          pairs: list[dict], eval_pairs: list[dict], progress: bool = True, overwrite: bool = False,
          resume: Path | None = None) -> AlignResult:
    """Align the checkpoint ``init_dir`` with ``objective``; write a run directory like pretraining's.

    ``resume``: a checkpoint of this run (``align.train.save_every``); training continues from it
    exactly (weights or LoRA adapters, optimizer, schedule, instrument sums). The reference is
    always the policy at ``init_dir``. TRL objectives (``loss: trl``) restart instead.
    """
    if objective.loss == "trl":
        from trainers.trl_dpo import align_with_trl  # noqa: PLC0415

        return align_with_trl(cfg, objective, init_dir, run_dir, tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs,
                              progress=progress, overwrite=overwrite)
    t, a = cfg.align.train, cfg.align
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, len(tokenizer), cfg.seed, init_from=str(init_dir)).to(device)
    if a.lora is not None:
        model = apply_lora(model, a.lora)
    loss_fn = build_loss(objective.loss, beta=a.beta, grade=objective.grade, lam=objective.lam)
    data = tokenize_pairs(pairs, tokenizer, a.max_len)
    eval_data = tokenize_pairs(eval_pairs, tokenizer, a.max_len) if eval_pairs else None
    ref = reference_logps(model, data, t.batch_size, device)  # the initial policy, also when resuming
    eval_ref = reference_logps(model, eval_data, t.batch_size, device) if eval_data else None
    suite = build_suite(cfg.instruments, model, cfg.seed)  # W0 = the initial policy's weights
    start = 0
    if resume is not None:
        state = load_trainer_state(resume)
        load_policy_weights(model, resume)
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t)
    if resume is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if suite is not None:
            suite.load_state_dict(load_instruments(resume) or {})
        start = state["step"]
    prepare_run_dir(run_dir, cfg, overwrite=overwrite, resuming=resume is not None)
    if resume is not None:
        truncate_after(run_dir / "metrics.jsonl", start)
    sinks = build_sinks(run_dir, cfg.tracking.report_to)

    per_step = t.batch_size * t.grad_accum
    last: dict = {}
    bar = tqdm(range(start + 1, t.steps + 1), desc=f"align {objective.name}", disable=not progress,
               dynamic_ncols=True, initial=start, total=t.steps)
    ctx = suite.attached(model, optimizer) if suite is not None else contextlib.nullcontext()
    try:
        with ctx:
            for step in bar:
                idx = batch_indices(len(ref[0]), per_step, step - 1, cfg.seed)
                if suite is not None:
                    suite.set_loss_normalizer(len(idx))
                metrics: dict[str, float] = {}
                for micro in idx.chunk(t.grad_accum):
                    c, r, n = pair_logps(model, data, micro, device)
                    out = loss_fn(c, r, ref[0][micro].to(device), ref[1][micro].to(device), n)
                    (out.loss * len(micro) / len(idx)).backward()
                    for k, v in out.metrics.items():
                        metrics[k] = metrics.get(k, 0.0) + v * len(micro) / len(idx)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                geometry = suite.after_optimizer_step(step, force=step == t.steps) if suite is not None else None
                row = {}
                if step % t.log_every == 0 or step == t.steps or geometry:
                    row = {**metrics, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)}
                if eval_data is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
                    row.update(preference_eval(model, eval_data, eval_ref, loss_fn, t.batch_size, device))
                if geometry:
                    row.update(geometry)
                if row:
                    sinks.log({"phase": f"align/{objective.name}", **row}, step)
                    last = {"step": step, **row}
                    bar.set_postfix({k.split("/")[-1]: f"{last[k]:.3g}" for k in
                                     ("pref/loss", "pref/accuracy", "rsf_out_pred/all/o") if k in last}, refresh=False)
                if t.save_every and step % t.save_every == 0 and step < t.steps:
                    state = suite.snapshot_state() if suite is not None else None
                    save_checkpoint(checkpoint_dir(run_dir, step), model=model, tokenizer=tokenizer,
                                    optimizer=optimizer, scheduler=scheduler, step=step, instruments=state)
        ckpt = save_aligned(run_dir, t.steps, model, tokenizer, optimizer, scheduler, suite)
    finally:
        bar.close()
        sinks.close()
    return AlignResult(run_dir, ckpt, last)


def load_policy_weights(model, checkpoint: Path) -> None:
    """Weights of a mid-run checkpoint: LoRA adapters (``adapter_model.safetensors``, saved by a
    PeftModel) or the full model (``model.safetensors``)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict  # noqa: PLC0415

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


def save_aligned(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, suite) -> Path:
    """Final checkpoint (LoRA adapters merged, so it is a plain HF model dir) and snapshot."""
    state = suite.snapshot_state() if suite is not None else None
    to_save = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    path = save_checkpoint(checkpoint_dir(run_dir, step), model=to_save, tokenizer=tokenizer, optimizer=optimizer,
                           scheduler=scheduler, step=step, instruments=state)
    if suite is not None:
        suite.save(run_dir / "instruments" / f"step_{step:07d}.safetensors", state=state)
    return path
