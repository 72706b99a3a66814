"""Cross-entropy pretraining with live geometry instruments: one loop, readable top to bottom.

    build everything (tokenizer, corpus, model, optimizer)   -> bad input fails before any file is written
    create the run directory (resolved config), or resume from a checkpoint
    for each optimizer step:
        draw the step's blocks (a pure function of seed and step, so resume is exact)
        forward + backward each micro-batch (loss = token sum / tokens in the whole step)
        clip, optimizer step (the instruments' optimizer hooks record G_t and U_t), lr schedule
        stream train + geometry metrics; evaluate; checkpoint

Loss scaling: the loss of a step is the sum of token cross-entropies divided by the number of
predicted tokens in the *whole* step (all micro-batches, all processes). Gradient accumulation
therefore gives exactly the gradient of one big batch, and the instruments undo that one
division (``set_loss_normalizer``) so ``C_delta`` holds per-token gradients.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from harness.build import build_corpus, build_model, build_suite, build_tokenizer, match_special_tokens
from harness.checkpoint import (checkpoint_dir, load_instruments, load_trainer_state, save_checkpoint,
                                set_rng_state)
from harness.config import RunConfig
from harness.data import batch_indices
from harness.rundir import prepare_run_dir
from harness.sinks import build_sinks, tracker_names, truncate_after
from trainers.optim import make_optimizer, make_scheduler


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict  # the last logged row
    tokens_per_s: float


def lm_loss_sum(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of packed blocks ``ids`` (B, T) and the number of predictions."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return loss, ids[:, 1:].numel()


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, n_batches: int, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(blocks), batch_size * n_batches), batch_size):
        loss, n = lm_loss_sum(model, blocks[start:start + batch_size].to(device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def pretrain(cfg: RunConfig, run_dir: Path | None = None, resume: str | Path | None = None,
             progress: bool = True, overwrite: bool = False) -> PretrainResult:
    """Pretrain ``cfg.model`` on ``cfg.data``; ``resume`` is a checkpoint directory of this run."""
    t = cfg.train
    run_dir = Path(run_dir or cfg.run_dir)
    torch.manual_seed(cfg.seed)

    # ---- build (fails before anything is written) ----
    tokenizer = build_tokenizer(cfg)
    train_blocks, eval_blocks = build_corpus(cfg, tokenizer)
    model = build_model(cfg.model, len(tokenizer), cfg.seed, str(resume) if resume else cfg.init_from)
    if not (resume or cfg.init_from) and cfg.model.source == "tiny":
        match_special_tokens(model, tokenizer)
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t)
    suite = build_suite(cfg.instruments, model, cfg.seed)
    trackers = tracker_names(cfg.tracking.report_to)  # e.g. wandb, mlflow
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(),
                              log_with=trackers or None, project_dir=str(run_dir))

    # ---- run directory, resume ----
    start_step = 0
    if resume is not None:
        state = load_trainer_state(Path(resume))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if suite is not None:
            suite.load_state_dict(load_instruments(Path(resume)) or {})
        start_step = state["step"]
    if accelerator.is_main_process:  # one process owns the directory (torchrun: the others would race it)
        prepare_run_dir(run_dir, cfg, resuming=resume is not None, overwrite=overwrite)
        if resume is not None:
            truncate_after(run_dir / "metrics.jsonl", start_step)
    accelerator.wait_for_everyone()
    model, optimizer = accelerator.prepare(model, optimizer)
    sinks = build_sinks(run_dir, cfg.tracking.report_to, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes

    per_step = t.batch_size * t.grad_accum  # global blocks per optimizer step
    bar = tqdm(total=t.steps, initial=start_step, desc=f"pretrain {cfg.name}", disable=not progress or rank != 0,
               dynamic_ncols=True)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    last_row: dict = {}
    tokens_per_s = 0.0
    ctx = suite.attached(model, optimizer) if suite is not None else contextlib.nullcontext()
    try:
        with ctx:
            for step in range(start_step + 1, t.steps + 1):
                idx = batch_indices(len(train_blocks), per_step, step - 1, cfg.seed)
                n_predicted = len(idx) * (train_blocks.shape[1] - 1)
                if suite is not None:  # this process's loss is scaled by world / n_predicted
                    suite.set_loss_normalizer(n_predicted / world)
                step_loss = 0.0
                for micro in idx.chunk(t.grad_accum):
                    ids = train_blocks[micro[rank::world]].to(accelerator.device)
                    with accelerator.autocast():
                        loss_sum, _ = lm_loss_sum(model, ids)
                    accelerator.backward(loss_sum * world / n_predicted)
                    step_loss += float(loss_sum.detach())
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                window_loss += step_loss
                window_tokens += n_predicted // world
                geometry = suite.after_optimizer_step(step, force=step == t.steps) if suite is not None else None
                row = {}
                if step % t.log_every == 0 or step == t.steps or geometry:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens * world / max(elapsed, 1e-9)
                    loss_total, tokens_total = window_loss, float(window_tokens)
                    if world > 1:  # the global mean over every process's tokens (all ranks log at the same steps)
                        totals = accelerator.reduce(torch.tensor([window_loss, float(window_tokens)], dtype=torch.float64,
                                                                 device=accelerator.device), reduction="sum")
                        loss_total, tokens_total = float(totals[0]), float(totals[1])
                    row = {"train/loss": loss_total / max(tokens_total, 1), "train/lr": scheduler.get_last_lr()[0],
                           "train/grad_norm": float(grad_norm), "train/tokens_per_s": tokens_per_s}
                    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps) and len(eval_blocks):
                    row["eval/loss"] = evaluate(model, eval_blocks, t.batch_size, t.eval_batches, accelerator.device)
                if geometry:
                    row.update(geometry)
                if row:
                    sinks.log({"phase": "pretrain", **row}, step)
                    last_row = {"step": step, **row}
                    bar.set_postfix(_postfix(last_row), refresh=False)
                if (t.save_every and step % t.save_every == 0) or step == t.steps:
                    _save(run_dir, step, accelerator, model, tokenizer, optimizer, scheduler, suite)
                bar.update(1)
    finally:
        bar.close()
        sinks.close()
    return PretrainResult(run_dir, checkpoint_dir(run_dir, t.steps), last_row, tokens_per_s)


def _save(run_dir, step, accelerator, model, tokenizer, optimizer, scheduler, suite) -> None:
    state = suite.snapshot_state() if suite is not None else None  # collective: every rank calls it
    if accelerator.is_main_process:
        save_checkpoint(checkpoint_dir(run_dir, step), model=accelerator.unwrap_model(model), tokenizer=tokenizer,
                        optimizer=optimizer, scheduler=scheduler, step=step, instruments=state)
        if suite is not None:
            suite.save(run_dir / "instruments" / f"step_{step:07d}.safetensors", state=state)
    accelerator.wait_for_everyone()


def _postfix(row: dict) -> dict:
    keys = {"train/loss": "loss", "eval/loss": "eval", "train/tokens_per_s": "tok/s",
            "rsf_in/all/q": "rsf_in q", "rsf_out_pred/all/o": "rsf_pred o"}
    return {short: f"{row[k]:.3g}" for k, short in keys.items() if k in row}
