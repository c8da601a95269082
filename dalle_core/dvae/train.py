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

Data parallel (paper: 64 GPUs at batch 512): when torch.distributed is
initialised (torchrun; orchestration/dvae_entry.py), `config.batch_size` is the
*global* batch, split evenly over the ranks. Each rank's source yields either its
own share (batch_size / world images: rank r holds images r*b .. r*b+b-1 of the
step's global batch, what `rank_image_batches` reads) or the whole global batch,
of which the rank keeps its share. The models are wrapped in
DistributedDataParallel (gradients averaged: the update is the one-process update
on the global batch); what is a statistic of the batch is made global: the
marginal KL's average code distribution (all-reduced), the logged losses
(averaged over ranks) and the k-means codebook init (on rank 0 from the gathered
first global batches, then broadcast). Under torch.distributed the gumbel noise
and the random crops are drawn per image from (seed, step, index in the global
batch), so 1 or N ranks, resumed or not, train alike; without it the noise comes
from one generator stream, as before. Rank 0 alone writes checkpoints and the
model file (checkpoint_dir must be shared by the ranks for a resume) and calls
`on_log`; usage / perplexity in the log are rank 0's share of the batch.
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
import torch.distributed as dist
import torch.nn as nn

from dalle_core.checkpointing import list_step_files, load_latest_step_file
from dalle_core.io import atomic_torch_save
from dalle_core.precision.device import cpu_has_fast_bf16

from .augment import random_crop_resize, sample_seed
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
# Data parallel


@dataclass(frozen=True)
class _Shard:
    """This process's place in the data-parallel group (world 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    distributed: bool = False
    global_batch: int = 1

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    @property
    def first_index(self) -> int:  # of this rank's images in the step's global batch
        return self.rank * self.local_batch

    @classmethod
    def current(cls, config: DVAEConfig) -> "_Shard":
        if not (dist.is_available() and dist.is_initialized()):
            return cls(global_batch=config.batch_size)
        rank, world = dist.get_rank(), dist.get_world_size()
        if config.batch_size % world:
            raise ValueError(f"the global batch {config.batch_size} does not split evenly over {world} ranks")
        return cls(rank=rank, world=world, distributed=True, global_batch=config.batch_size)

    def take(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's share of a batch the source yielded (its share, or the whole global batch)."""
        if self.world == 1 or len(images) == self.local_batch:
            return images
        if len(images) == self.global_batch:
            return images[self.first_index : self.first_index + self.local_batch]
        raise ValueError(f"batch for step {step} holds {len(images)} images: rank {self.rank} of {self.world} "
                         f"expects its share ({self.local_batch}) or the global batch ({self.global_batch})")

    def gather(self, images: torch.Tensor) -> torch.Tensor:
        """The global batch from every rank's share, in rank order (all ranks get it)."""
        if not self.distributed or self.world == 1:
            return images
        parts = [torch.empty_like(images) for _ in range(self.world)]
        dist.all_gather(parts, images.contiguous())
        return torch.cat(parts)

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed and self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def global_marginal(self, q: torch.Tensor) -> torch.Tensor:
        """The global batch's average code distribution, valued as the all-reduced mean,
        with the gradient flowing to this rank's share. DDP then averages the ranks'
        gradients: (1/W) sum_r dm/dq_bar . dq_r/dtheta, exactly the one-process gradient of
        m(q_bar) with q_bar = (1/W) sum_r q_r."""
        g = self.mean_(q.detach().clone())
        return q + (g - q.detach())

    def uniforms(self, shape: torch.Size, device: torch.device, seed: int, step: int) -> torch.Tensor:
        """U(0, 1) noise for the gumbel relaxation, image by image from (seed, step, global index)."""
        out = torch.empty(shape, device=device)
        g = torch.Generator(device=device)
        for i in range(shape[0]):
            g.manual_seed(sample_seed(seed, step, self.first_index + i, "gumbel"))
            out[i] = torch.rand(shape[1:], generator=g, device=device)
        return out


def rank_image_batches(paths: list, global_batch: int, image_size: int, seed: int = 0, start_step: int = 0,
                       rank: int = 0, world: int = 1, shuffle_buffer: int = 1000) -> Iterator[torch.Tensor]:
    """This rank's share of each global batch that `dalle_core.data.loader.image_batches`
    yields (same order, same epochs), decoding only the rank's images: rank r gets
    images r*b .. r*b+b-1 of every global batch of `global_batch`, b = global_batch / world."""
    from dalle_core.data.loader import image_to_tensor, iter_samples

    if global_batch % world:
        raise ValueError(f"the global batch {global_batch} does not split evenly over {world} ranks")
    b = global_batch // world
    lo, hi = rank * b, rank * b + b
    images, n, step = [], 0, 0
    for key, image, _ in iter_samples(paths, seed, shuffle_buffer):
        if step >= start_step and lo <= n < hi:
            images.append(image_to_tensor(image, image_size, name=f"sample {key}"))
        n += 1
        if n == global_batch:
            if step >= start_step:
                yield torch.stack(images)
            images, n, step = [], 0, step + 1


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
                      device: torch.device, shard: _Shard | None = None) -> dict[str, float] | None:
    """k-means codebook init on the first training batches (the same ones step 0
    on reads: the init is part of the run, so a rerun repeats it exactly). Data
    parallel: on rank 0, from the ranks' shares gathered into the global batches;
    the result is broadcast to every rank (rank 0 returns the stats, others None)."""
    shard = shard or _Shard(global_batch=config.batch_size)
    it, seen = _open_batches(batches, 0), []
    while sum(len(b) for b in seen) * shard.world < config.codebook_init_images:
        try:
            batch = next(it)
        except StopIteration:
            break
        # the same check and wording as the training loop: these are the batches its steps read
        validate_images(batch, config.image_size, config.input_channels, what=f"batch for step {len(seen)}")
        seen.append(shard.take(batch, len(seen)))
    if not seen:
        raise ValueError("codebook_init='kmeans' needs training images, the batch source is empty")
    images = torch.cat([shard.gather(b) for b in seen])[: config.codebook_init_images]
    stats = None
    if shard.rank == 0:
        stats = kmeans_codebook_init(encoder, images.to(device), logit_std=config.codebook_init_logit_std,
                                     seed=config.seed)
    if shard.distributed:
        _broadcast_module(encoder)
    return stats


def _broadcast_module(module: nn.Module) -> None:
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_contiguous():
                dist.broadcast(t.data, 0)
            else:  # channels_last parameters: broadcast a contiguous copy
                buf = t.data.contiguous()
                dist.broadcast(buf, 0)
                t.data.copy_(buf)


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
    shard = _Shard.current(config)
    writer = shard.rank == 0  # rank 0 alone writes checkpoints and the model, and reports
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
        init_stats = _kmeans_init_from(batches, encoder, config, device, shard)
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
    elif writer:
        for _, p in _list_checkpoints(checkpoint_dir):
            p.unlink()
    if writer:
        for tmp in checkpoint_dir.glob("*.pt.tmp-*"):  # left by a run killed while writing
            tmp.unlink(missing_ok=True)
    enc_fwd, dec_fwd = encoder, decoder
    if shard.distributed:
        dist.barrier()  # every rank has read the checkpoint before rank 0 writes the next
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if on_cuda else None
        # DDP broadcasts rank 0's parameters and buffers, then averages the gradients
        enc_fwd, dec_fwd = DDP(encoder, device_ids=ids), DDP(decoder, device_ids=ids)

    def save_checkpoint() -> Path:
        path = checkpoint_dir / checkpoint_name(step)
        if not writer:
            return path
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
        images = shard.take(images, step)
        if config.random_crop:  # the paper's crop + resize, image by image (augment.py)
            images = random_crop_resize(images, config.seed, step, shard.first_index, config.random_crop_zoom,
                                        config.random_crop_flip)
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)

        # schedules for this update
        tau, beta, lr = temperature_at(step, config), kl_weight_at(step, config), lr_at(step, config)
        for g in opt.param_groups:
            g["lr"] = lr

        # forward: encoder logits -> relaxed one-hot sample -> decoder (mu, ln b)
        with torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext():
            logits = enc_fwd(map_pixels(images))
            u = shard.uniforms(logits.shape, device, config.seed + 1, step) if shard.distributed else None
            z = gumbel_softmax_relaxation(logits, tau, generator=noise_gen, uniforms=u)
            stats = dec_fwd(z)
        losses = elb_loss(images, logits.float(), stats.float(), beta, config.marginal_kl_weight,
                          config.pixel_mse_weight,
                          marginal_reduce=shard.global_marginal if shard.distributed else None)
        loss = losses["total"]
        losses = {k: v.detach() for k, v in losses.items()}
        finite = torch.isfinite(loss)
        if shard.distributed:  # every rank stops together (one rank alone would leave the others waiting)
            flag = finite.float().reshape(1).cpu()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite and not use_scaler:
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
            if shard.distributed:  # the global batch's losses: the mean of the ranks' (equal) shares
                keys = sorted(losses)
                avg = shard.mean_(torch.stack([losses[k].float() for k in keys]))
                losses = dict(zip(keys, avg))
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
        if log_now and on_log is not None and writer:
            on_log(step, history[-1])

    if last_ckpt is None:  # total_steps already reached and nothing on disk (cannot happen normally)
        last_ckpt = save_checkpoint()
    ema_enc.module.requires_grad = ema_dec.module.requires_grad = False
    for m in (encoder, decoder, ema_enc.module, ema_dec.module):  # back to the layout load_dvae builds
        m.to(memory_format=torch.contiguous_format)
    model_path = checkpoint_dir / "dvae.pt"
    if writer:
        model_path = save_dvae(model_path, ema_enc.module, ema_dec.module, config)
    if shard.distributed:
        dist.barrier()  # the files exist when any rank returns
    return TrainResult(
        encoder=ema_enc.module, decoder=ema_dec.module, config=config, step=step, history=history,
        checkpoint_path=last_ckpt, model_path=model_path, resumed_from=resumed_from,
        raw_encoder=encoder, raw_decoder=decoder, codebook_init=init_stats,
    )


__all__ = ["TrainResult", "EMA", "BatchSource", "train_dvae", "checkpoint_name", "rank_image_batches"]
