"""Training the contrastive reranker (`dalle_core.rerank.model`).

`train_reranker(config, pair_batches_fn, checkpoint_dir)` runs AdamW (or Muon on
the linear layers' matrices: ``optimizer="muon"``, dalle_core/muon.py) on the
symmetric InfoNCE loss over batches of (images float [b, 3, H, W] in [0, 1],
caption ids [b, text_len]), optionally with hard-negative captions
[b, K, text_len] as a third item (see `ContrastiveReranker.loss`);
``pair_batches_fn(k)`` returns an iterator whose first batch is batch k (so a
resumed run sees the data it would have seen).

- precision: ``amp_dtype="bf16"`` runs the forward pass under
  ``torch.autocast`` in bfloat16 where the device has fast bf16
  (`dalle_core.precision.device`; "auto" likewise), else fp32; the ``start`` record says which
  (``amp``); parameters, optimizer state and the loss stay fp32;
- learning rate: linear warm-up over ``warmup_steps`` to ``lr``, then cosine
  decay to ``lr * lr_end_factor`` at ``total_steps``; weight decay on the
  matrices of the linears and convs only; gradient norm clipped at ``grad_clip``;
- logs through ``on_log(record)``: loss, in-batch retrieval accuracy
  (image -> caption and caption -> image, and their mean), the temperature,
  the learning rate, pairs/s; one record at the first step, every
  ``log_every`` steps and at the end;
- checkpoints (atomic, the newest ``keep_checkpoints`` kept) every
  ``checkpoint_every`` steps and at the end, holding the model, the optimizer,
  the step and the RNG states; with ``resume=True`` training continues from the
  newest readable checkpoint and ends exactly where an uninterrupted run would
  (tested); a checkpoint of another model shape is refused;
- at the end the model is written with `save_reranker` (config pinned).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dalle_core.checkpointing import list_step_files, load_latest_step_file
from dalle_core.io import atomic_torch_save
from dalle_core.muon import LR_RATIO, build_muon_with_adamw

from .model import (
    CHECKPOINT_FORMAT,
    SHAPE_FIELDS,
    ContrastiveReranker,
    RerankerConfig,
    autocast_dtype,
    save_reranker,
)

PairBatches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
CHECKPOINT_GLOB = "reranker-step-*.pt"


def checkpoint_name(step: int) -> str:
    return f"reranker-step-{step:08d}.pt"


@dataclass
class RerankTrainResult:
    steps: int  # the last step reached
    start_step: int
    resumed_from: int | None
    losses: list[float]  # every update of this call
    accuracies: list[float]  # in-batch retrieval accuracy (mean of both directions) per update
    final_loss: float | None
    final_accuracy: float | None
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    model_path: str | None = None
    elapsed_s: float = 0.0
    model: ContrastiveReranker | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model")
        return d


def lr_at(config: RerankerConfig, step: int, total: int) -> float:
    """Linear warm-up then cosine decay to lr * lr_end_factor (step is 0-based)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(total - config.warmup_steps, 1)
    t = min((step - config.warmup_steps) / span, 1.0)
    end = config.lr * config.lr_end_factor
    return end + 0.5 * (config.lr - end) * (1 + math.cos(math.pi * t))


def reranker_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The linear layers' weight matrices (text blocks, the two projections): what Muon
    takes with `optimizer="muon"`; not the token and position embeddings, nor the convs."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def build_optimizer(model: nn.Module, config: RerankerConfig):
    """AdamW, weight decay on the matrices of the linears and convs; with `optimizer="muon"`
    the linears' matrices on Muon instead (dalle_core/muon.py)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    decay = [p for p in model.parameters() if id(p) in decay_ids]
    other = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if config.optimizer == "muon":
        return build_muon_with_adamw(reranker_matrices(model), groups, lr=config.lr,
                                     muon_lr_ratio=config.muon_lr_ratio, weight_decay=config.weight_decay,
                                     betas=config.betas, eps=config.eps)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


# --- checkpoints --------------------------------------------------------------------------------

def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    return list_step_files(checkpoint_dir, CHECKPOINT_GLOB)


def _latest_checkpoint(checkpoint_dir: Path) -> tuple[dict, Path] | None:
    return load_latest_step_file(checkpoint_dir, CHECKPOINT_GLOB, CHECKPOINT_FORMAT, "reranker")


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "python" in s:
        random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))


# --- training -------------------------------------------------------------------------------------

def train_reranker(
    config: RerankerConfig,
    pair_batches_fn: PairBatches,
    checkpoint_dir: str | Path,
    on_log: Callable[[dict], None] | None = None,
    total_steps: int | None = None,
    resume: bool = True,
    *,
    device: str | torch.device = "cpu",
    log_every: int | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    stop_after: int | None = None,
    save_final: bool = True,
    model_filename: str = "reranker.pt",
) -> RerankTrainResult:
    """Train (or resume training) the reranker; see the module docstring.
    `stop_after`: return after that many updates in total, with a checkpoint,
    as if interrupted."""
    t_start = time.time()
    total = int(total_steps if total_steps is not None else config.total_steps)
    if total < 0:
        raise ValueError(f"total_steps must be >= 0, got {total}")
    log_every = int(log_every or config.log_every)
    checkpoint_every = int(checkpoint_every or config.checkpoint_every)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)

    torch.manual_seed(config.seed)
    model = ContrastiveReranker(config).to(device)
    optimizer = build_optimizer(model, config)

    start, resumed_from = 0, None
    if resume:
        found = _latest_checkpoint(checkpoint_dir)
        if found is not None:
            ckpt, path = found
            saved = RerankerConfig.from_dict(ckpt.get("config") or {})
            diff = {k: (getattr(saved, k), getattr(config, k)) for k in SHAPE_FIELDS
                    if getattr(saved, k) != getattr(config, k)}
            if diff:
                raise ValueError(f"cannot resume from {path}: the model shape differs (checkpoint, now): "
                                 f"{diff}; use another checkpoint_dir or resume=False")
            if saved.optimizer != config.optimizer:
                raise ValueError(f"cannot resume from {path}: it was trained with optimizer {saved.optimizer!r}, "
                                 f"this run asks for {config.optimizer!r}; use another checkpoint_dir or resume=False")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"])
            start = resumed_from = int(ckpt["step"])

    history: list[dict] = []
    losses: list[float] = []
    accs: list[float] = []
    last_ckpt: str | None = None

    def emit(record: dict) -> None:
        history.append(record)
        if on_log is not None:
            on_log(record)

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        path = checkpoint_dir / checkpoint_name(step)
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "step": step,
                      "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "optimizer": optimizer.state_dict(), "rng": _rng_state()}, path)
        for _, old in list_checkpoints(checkpoint_dir)[:-keep_checkpoints]:
            old.unlink(missing_ok=True)
        last_ckpt = str(path)
        emit({"event": "checkpoint", "step": step, "path": str(path)})

    amp = autocast_dtype(config, device)
    emit({"event": "start", "step": start, "total_steps": total, "resumed_from": resumed_from,
          "n_params": model.num_parameters(), "amp": "bf16" if amp is not None else "fp32"})
    model.train()
    step = start
    window_t, window_pairs = time.time(), 0
    if start < total:
        batches = pair_batches_fn(start)
        for step in range(start, total):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"pair_batches_fn({start}) ran out of batches at step {step}; "
                                 f"it must yield at least {total - start}") from None
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise ValueError("pair_batches_fn must yield (images, text) or (images, text, negatives), "
                                 f"got {type(batch).__name__}")
            images, text = batch[0], batch[1]
            negatives = batch[2] if len(batch) == 3 else None
            lr = lr_at(config, step, total)
            for g in optimizer.param_groups:  # Muon's groups move lr_ratio x as fast (dalle_core/muon.py)
                g["lr"] = lr * g.get(LR_RATIO, 1.0)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                out = model.loss(images, text, negatives)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       config.grad_clip if config.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            loss, acc = float(out["loss"].detach()), float(out["acc"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite reranker loss {loss} at update {done}; last checkpoint "
                                         f"{last_ckpt or 'none from this call'} - lower the learning rate")
            losses.append(loss)
            accs.append(acc)
            window_pairs += images.shape[0]
            if done % log_every == 0 or done == total or done == start + 1:
                now = time.time()
                emit({"event": "log", "step": done, "loss": loss, "acc": acc,
                      "acc_image_to_text": float(out["acc_image_to_text"]),
                      "acc_text_to_image": float(out["acc_text_to_image"]),
                      "temperature": float(1.0 / model.scale().detach()), "lr": lr,
                      "grad_norm": float(grad_norm), "batch_size": images.shape[0],
                      **{k: float(out[k].detach()) for k in ("loss_hard", "acc_hard") if k in out},
                      "pairs_per_s": window_pairs / max(now - window_t, 1e-9)})
                window_t, window_pairs = now, 0
            stopping = stop_after is not None and done >= stop_after
            if done % checkpoint_every == 0 or done == total or stopping:
                checkpoint(done)
            if stopping:
                break
        step = done

    model_path = None
    if save_final and step >= total:
        model_path = save_reranker(checkpoint_dir / model_filename, model,
                                   meta={"steps": step, "final_loss": losses[-1] if losses else None,
                                         "final_accuracy": accs[-1] if accs else None})
    model.eval()
    result = RerankTrainResult(
        steps=step, start_step=start, resumed_from=resumed_from, losses=losses, accuracies=accs,
        final_loss=losses[-1] if losses else None, final_accuracy=accs[-1] if accs else None,
        history=history, checkpoint=last_ckpt, model_path=str(model_path) if model_path else None,
        elapsed_s=time.time() - t_start, model=model)
    emit({"event": "end", "step": step, "final_loss": result.final_loss,
          "final_accuracy": result.final_accuracy, "elapsed_s": result.elapsed_s,
          "model_path": result.model_path})
    return result


__all__ = ["RerankTrainResult", "build_optimizer", "checkpoint_name", "list_checkpoints", "lr_at", "reranker_matrices",
           "train_reranker"]
