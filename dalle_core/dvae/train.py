"""dVAE training loop (paper appendix A.2), checkpointing and model files.

    result = train_dvae(config, batches, checkpoint_dir, on_log=print)

* AdamW with the cosine learning-rate, temperature and KL-weight schedules of
  `schedules.py`; an EMA of the weights (the exported model); `torch.autocast`
  on CUDA (bf16, or fp16 with a GradScaler); on CPU fp32, or bf16 with
  `config.cpu_bf16` where the CPU has bf16 instructions.
* Logged every `log_every` steps: total / recon / kl (nats per pixel value, see
  losses.py), temperature, beta (KL weight), lr, grad_norm, codebook usage and
  perplexity: the numbers that show the KL term hurting reconstruction or the
  codebook collapsing.
* Checkpoints every `checkpoint_every` steps and at the end, written atomically
  (temporary file, fsync, rename), holding model + EMA + optimizer + scaler +
  step + config dict + RNG states + log history. A run killed at any step and
  started again with `resume=True` continues from its newest readable
  checkpoint and ends with exactly the parameters of an uninterrupted run, as
  long as the data source replays the same batches (see `BatchSource`).

Data: `batches` is either
  - a callable `start_step -> iterator of batches` (preferred): on resume it is
    called with the step to continue from and must yield the batch for that step
    first; or
  - a re-iterable (list, Dataset-backed DataLoader without shuffling, an object
    whose __iter__ replays the same order): it is cycled epoch after epoch, and
    on resume the first `start_step` batches are read and skipped.
Each batch is a float32 tensor [B, C, H, W] with values in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import torch
import torch.nn as nn

from dalle_core.checkpointing import list_step_files, load_latest_step_file
from dalle_core.io import atomic_torch_save
from dalle_core.precision.device import cpu_has_fast_bf16

from .codebook_init import kmeans_codebook_init
from .config import SHAPE_FIELDS, DVAEConfig
from .losses import code_stats, elb_loss, gumbel_softmax_relaxation
from .model import CHECKPOINT_FORMAT, Decoder, Encoder, build_dvae, map_pixels, save_dvae, validate_images
from .schedules import kl_weight_at, lr_at, temperature_at

BatchSource = Union[Callable[[int], Iterable[torch.Tensor]], Iterable[torch.Tensor]]
LogFn = Callable[[int, dict], None]

CHECKPOINT_GLOB = "dvae-step-*.pt"


def checkpoint_name(step: int) -> str:
    return f"dvae-step-{step:09d}.pt"


@dataclass
class TrainResult:
    encoder: Encoder  # EMA weights: what is exported and evaluated
    decoder: Decoder
    config: DVAEConfig
    step: int
    history: list[dict] = field(default_factory=list)  # one dict per logged step
    checkpoint_path: Path | None = None  # the last training checkpoint
    model_path: Path | None = None  # save_dvae file of the EMA weights
    resumed_from: int | None = None  # step the run resumed from, if it did
    raw_encoder: Encoder | None = None  # the optimised (non-EMA) weights
    raw_decoder: Decoder | None = None
    codebook_init: dict | None = None  # codes in use / perplexity after a k-means init (fresh runs)

    @property
    def final_metrics(self) -> dict:
        return dict(self.history[-1]) if self.history else {}


# -----------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of a module's parameters and buffers.

    The decay used at update n is min(decay, (1 + n) / (10 + n)), so the average
    is not dominated by the random initialisation in short runs (the paper's
    0.999 applies unchanged once n > ~9000)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [p for p in self.module.parameters()]
        cur = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - d)
        for be, bc in zip(self.module.buffers(), module.buffers()):
            be.copy_(bc)
        self.updates += 1


# -----------------------------------------------------------------------------
# Data


def _open_batches(batches: BatchSource, start_step: int) -> Iterator[torch.Tensor]:
    if callable(batches):
        return iter(batches(start_step))

    def cycle() -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            n = 0
            for b in batches:
                n += 1
                yield b
            if n == 0:
                what = "is empty" if epoch == 0 else "yielded nothing when iterated again (a one-shot generator?)"
                raise ValueError(f"batches {what}; pass a list / re-iterable, or a callable "
                                 f"start_step -> iterator")
            epoch += 1

    it = cycle()
    for _ in itertools.islice(it, start_step):  # replay to the resume point
        pass
    return it


def _kmeans_init_from(batches: BatchSource, encoder: Encoder, config: DVAEConfig,
                      device: torch.device) -> dict[str, float]:
    """k-means codebook init on the first training batches (the same ones step 0
    on reads: the init is part of the run, so a rerun repeats it exactly)."""
    it, seen = _open_batches(batches, 0), []
    while sum(len(b) for b in seen) < config.codebook_init_images:
        try:
            batch = next(it)
        except StopIteration:
            break
        # the same check and wording as the training loop: these are the batches its steps read
        validate_images(batch, config.image_size, config.input_channels, what=f"batch for step {len(seen)}")
        seen.append(batch)
    if not seen:
        raise ValueError("codebook_init='kmeans' needs training images, the batch source is empty")
    images = torch.cat(seen)[: config.codebook_init_images]
    return kmeans_codebook_init(encoder, images.to(device), logit_std=config.codebook_init_logit_std,
                                seed=config.seed)


# -----------------------------------------------------------------------------
# Checkpoint files (atomic writes)


def _list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    return list_step_files(checkpoint_dir, CHECKPOINT_GLOB)


def _load_latest_checkpoint(checkpoint_dir: Path) -> tuple[dict, Path] | None:
    return load_latest_step_file(checkpoint_dir, CHECKPOINT_GLOB, CHECKPOINT_FORMAT, "dVAE")


def _check_resume_config(saved: dict, config: DVAEConfig, path: Path) -> None:
    diff = {k: (saved.get(k), getattr(config, k)) for k in SHAPE_FIELDS if saved.get(k) != getattr(config, k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {path}: the model shape differs ({detail}); "
                         f"use another checkpoint_dir or resume=False")
    other = {k: (v, config.to_dict().get(k)) for k, v in saved.items()
             if k not in SHAPE_FIELDS and config.to_dict().get(k) != v}
    if other:
        warnings.warn(f"resuming from {path} with changed training settings "
                      f"{ {k: f'{a} -> {b}' for k, (a, b) in other.items()} }; the result will "
                      f"differ from an uninterrupted run")


# -----------------------------------------------------------------------------
# The training loop


def train_dvae(config: DVAEConfig, batches: BatchSource, checkpoint_dir: str | Path,
               on_log: LogFn | None = None, device: str | torch.device = "cpu",
               resume: bool = True) -> TrainResult:
    """Train a dVAE for `config.total_steps` updates (see the module docstring).

    With resume=True the newest readable checkpoint in `checkpoint_dir` is
    continued (a finished run is just loaded back); with resume=False training
    starts from scratch and old step checkpoints in the directory are removed.
    Raises ValueError for a bad batch (naming the step and the problem) and
    FloatingPointError on a non-finite loss in fp32/bf16.
    """
    device = torch.device(device)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    on_cuda = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[config.amp_dtype]
    if device.type == "cpu":  # bf16 only where the CPU computes it natively (config.cpu_bf16)
        amp_dtype = torch.bfloat16 if config.cpu_bf16 and cpu_has_fast_bf16() else None
    use_amp = (on_cuda or device.type == "cpu") and amp_dtype is not None
    use_scaler = use_amp and amp_dtype == torch.float16

    # Models are initialised on the CPU from config.seed (same init on any device),
    # without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder, decoder = build_dvae(config, requires_grad=True, use_mixed_precision=use_amp)
    # channels_last is the layout oneDNN's and cuDNN's fast convolutions want:
    # 20% off a small dVAE's CPU training step (bench/dvae.py), same numbers
    encoder.to(device, memory_format=torch.channels_last).train()
    decoder.to(device, memory_format=torch.channels_last).train()
    init_stats = None
    if config.codebook_init == "kmeans" and not (resume and _list_checkpoints(checkpoint_dir)):
        init_stats = _kmeans_init_from(batches, encoder, config, device)
    ema_enc, ema_dec = EMA(encoder, config.ema_decay), EMA(decoder, config.ema_decay)

    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                            weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if on_cuda else None
    # the gumbel noise has its own generator, so a resume redraws the same noise
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(config.seed + 1)

    step, history, resumed_from, last_ckpt = 0, [], None, None
    if resume:
        found = _load_latest_checkpoint(checkpoint_dir)
        if found is not None:
            ckpt, last_ckpt = found
            _check_resume_config(ckpt["config"], config, last_ckpt)
            encoder.load_state_dict(ckpt["encoder"])
            decoder.load_state_dict(ckpt["decoder"])
            ema_enc.module.load_state_dict(ckpt["ema_encoder"])
            ema_dec.module.load_state_dict(ckpt["ema_decoder"])
            ema_enc.updates = ema_dec.updates = int(ckpt["ema_updates"])
            opt.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            noise_gen.set_state(ckpt["rng"]["noise"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if on_cuda and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
            step = resumed_from = int(ckpt["step"])
            history = list(ckpt.get("history", []))
    else:
        for _, p in _list_checkpoints(checkpoint_dir):
            p.unlink()
    for tmp in checkpoint_dir.glob("*.pt.tmp-*"):  # left by a run killed while writing
        tmp.unlink(missing_ok=True)

    def save_checkpoint() -> Path:
        obj = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": config.to_dict(),
            "encoder": encoder.state_dict(),
            "decoder": decoder.state_dict(),
            "ema_encoder": ema_enc.module.state_dict(),
            "ema_decoder": ema_dec.module.state_dict(),
            "ema_updates": ema_enc.updates,
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and use_scaler else None,
            "rng": {
                "noise": noise_gen.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if on_cuda else None,
            },
            "history": history,
        }
        path = checkpoint_dir / checkpoint_name(step)
        atomic_torch_save(obj, path)
        for _, old in _list_checkpoints(checkpoint_dir)[: -config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    data = _open_batches(batches, step) if step < config.total_steps else iter(())
    t_last = time.perf_counter()
    while step < config.total_steps:
        try:
            images = next(data)
        except StopIteration:
            raise ValueError(f"batches ran out at step {step} of {config.total_steps}; the source "
                             f"must yield one batch per step (cycle your data)") from None
        validate_images(images, config.image_size, config.input_channels, what=f"batch for step {step}")
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)

        # schedules for this update
        tau, beta, lr = temperature_at(step, config), kl_weight_at(step, config), lr_at(step, config)
        for g in opt.param_groups:
            g["lr"] = lr

        # forward: encoder logits -> relaxed one-hot sample -> decoder (mu, ln b)
        with torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext():
            logits = encoder(map_pixels(images))
            z = gumbel_softmax_relaxation(logits, tau, generator=noise_gen)
            stats = decoder(z)
        losses = elb_loss(images, logits.float(), stats.float(), beta, config.marginal_kl_weight,
                          config.pixel_mse_weight)
        loss = losses["total"]
        losses = {k: v.detach() for k, v in losses.items()}
        if not torch.isfinite(loss) and not use_scaler:
            raise FloatingPointError(
                f"non-finite dVAE loss at step {step} (recon {float(losses['recon'])}, kl "
                f"{float(losses['kl'])}); last checkpoint: {last_ckpt}")

        # backward + update
        opt.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            scaler.step(opt)  # skipped by the scaler if the gradients are not finite
            scaler.update()
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            opt.step()
        ema_enc.update(encoder)
        ema_dec.update(decoder)
        step += 1

        log_now = step % config.log_every == 0 or step == config.total_steps
        if log_now:
            now = time.perf_counter()
            metrics = {
                "step": step,
                "total": float(losses["total"]),
                "recon": float(losses["recon"]),
                "kl": float(losses["kl"]),
                **{k: float(losses[k]) for k in ("marginal_kl", "pixel_mse") if k in losses},
                "temperature": tau,
                "beta": beta,
                "lr": lr,
                "grad_norm": float(grad_norm),
                **code_stats(logits.detach()),
                "sec_per_step": (now - t_last) / config.log_every,
            }
            t_last = now
            history.append(metrics)
        # checkpoint before reporting, so a failing logger never loses the step
        if step % config.checkpoint_every == 0 or step == config.total_steps:
            last_ckpt = save_checkpoint()
        if log_now and on_log is not None:
            on_log(step, history[-1])

    if last_ckpt is None:  # total_steps already reached and nothing on disk (cannot happen normally)
        last_ckpt = save_checkpoint()
    ema_enc.module.requires_grad = ema_dec.module.requires_grad = False
    for m in (encoder, decoder, ema_enc.module, ema_dec.module):  # back to the layout load_dvae builds
        m.to(memory_format=torch.contiguous_format)
    model_path = save_dvae(checkpoint_dir / "dvae.pt", ema_enc.module, ema_dec.module, config)
    return TrainResult(
        encoder=ema_enc.module, decoder=ema_dec.module, config=config, step=step, history=history,
        checkpoint_path=last_ckpt, model_path=model_path, resumed_from=resumed_from,
        raw_encoder=encoder, raw_decoder=decoder, codebook_init=init_stats,
    )


__all__ = ["TrainResult", "EMA", "BatchSource", "train_dvae", "checkpoint_name"]
