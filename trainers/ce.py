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

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from weightgeom.core.config import RunConfig
from weightgeom.core.data import batch_indices
from weightgeom.core.models import build_model, match_special_tokens
from weightgeom.core.processes import on_main
from weightgeom.core.shards import load_corpus
from weightgeom.core.stage_inputs import corpus_cache, stage_tokenizer, starting_model
from weightgeom.trainers.session import RunResult, TrainingSession


def lm_loss_sum(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of packed blocks ``ids`` (B, T) and the number of predictions."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return loss, ids[:, 1:].numel()


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, n_batches: int, device) -> float:
    """Mean next-token loss over the first ``batch_size * n_batches`` held-out blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(blocks), batch_size * n_batches), batch_size):
        loss, n = lm_loss_sum(model, blocks[start:start + batch_size].to(device))
        total, count = total + loss.double(), count + n  # summed on the device: one read at the end
    model.train(was_training)
    return float(total) / max(count, 1)


class LossWindow:
    """Token loss and throughput since the last logged step, over all processes. The loss sums stay on
    the device (in float64) until ``flush``: no host sync per micro-batch. A checkpoint written inside a
    window keeps its sums (:meth:`state`), so the first row after a resume is the row an uninterrupted
    run logs."""

    def __init__(self) -> None:
        self.loss, self.tokens, self.start = 0.0, 0, time.perf_counter()

    def state(self, session: TrainingSession) -> dict:
        """The window's sums over all processes (a collective; checkpoints are saved on every process)."""
        totals = session.reduce_sum({"loss": float(self.loss), "tokens": float(self.tokens)})
        return {"loss": totals["loss"], "tokens": int(totals["tokens"])}

    def restore(self, state: dict, session: TrainingSession) -> None:
        """Sums of :meth:`state`, kept by the main process only (the next flush sums over processes)."""
        if state and session.rank == 0:
            self.loss, self.tokens = float(state["loss"]), int(state["tokens"])

    def add(self, loss_sum: torch.Tensor, tokens: int) -> None:
        self.loss, self.tokens = self.loss + loss_sum.detach().double(), self.tokens + tokens

    def flush(self, session: TrainingSession) -> tuple[float, float]:
        """(mean loss per token, tokens/s), both global; then start a new window."""
        elapsed = time.perf_counter() - self.start
        totals = session.reduce_sum({"loss": float(self.loss), "tokens": float(self.tokens)})
        out = totals["loss"] / max(totals["tokens"], 1), self.tokens * session.world / max(elapsed, 1e-9)
        self.__init__()
        return out


def pretrain(cfg: RunConfig, run_dir: Path | None = None, resume: str | Path | None = None,
             progress: bool = True, overwrite: bool = False) -> RunResult:
    """Pretrain ``cfg.model`` on ``cfg.data``; ``resume`` is a checkpoint directory of this run."""
    t = cfg.train
    torch.manual_seed(cfg.seed)
    # continued pretraining reads the starting model's own tokenizer, as the later stages do
    tokenizer = stage_tokenizer(cfg, starting_model(cfg))
    # The corpus is prepared (tokenized into shards) once, by the main process; then every process reads it.
    on_main(load_corpus, cfg.data, tokenizer, cfg.seed, corpus_cache(cfg), progress=progress, announce=False)
    train_blocks, eval_blocks = load_corpus(cfg.data, tokenizer, cfg.seed, corpus_cache(cfg), progress=False)
    model = build_model(cfg.model, len(tokenizer), cfg.seed, str(resume) if resume else cfg.init_from,
                        cache_dir=cfg.tokenizer.cache_dir)
    if not (resume or cfg.init_from) and cfg.model.source == "tiny":
        match_special_tokens(model, tokenizer)
    session = TrainingSession(cfg, t, Path(run_dir or cfg.run_dir), phase="pretrain", model=model,
                              tokenizer=tokenizer, resume=resume, overwrite=overwrite, progress=progress)
    per_step = t.batch_size * t.grad_accum  # global blocks per optimizer step
    window = LossWindow()
    window.restore(session.carry("loss_window", lambda: window.state(session)), session)
    with session:
        for step in session.steps():
            idx = batch_indices(len(train_blocks), per_step, step - 1, cfg.seed)
            n_predicted = len(idx) * (train_blocks.shape[1] - 1)
            session.suite.set_loss_normalizer(n_predicted / session.world)  # this process's loss: * world / n
            for micro in idx.chunk(t.grad_accum):
                ids = train_blocks[micro[session.rank::session.world]].to(session.device)
                with session.autocast():
                    loss_sum, _ = lm_loss_sum(session.model, ids)
                session.backward(loss_sum * session.world / n_predicted)
                window.add(loss_sum, n_predicted // session.world)
            grad_norm, geometry = session.optimizer_step(step)
            row = {}
            if session.log_due(step) or geometry:
                loss, tokens_per_s = window.flush(session)
                row = {"train/loss": loss, "train/lr": session.lr, "train/grad_norm": grad_norm,
                       "train/tokens_per_s": tokens_per_s}
            if session.eval_due(step) and len(eval_blocks):
                row["eval/loss"] = evaluate(session.model, eval_blocks, t.batch_size, t.eval_batches, session.device)
            session.end_step(step, {**row, **(geometry or {})})
    session.files.record(tokens_seen=t.steps * per_step * train_blocks.shape[1])
    return session.result
