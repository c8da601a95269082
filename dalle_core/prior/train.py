"""Training the transformer prior (paper section 2.2, 2.4, 2.5; appendices B, D).

`train_prior(config, training, ...)` (the model's `PriorConfig` and its
`PriorTrainingConfig`, both from the profile) is one loop for every size: a single process on a laptop CPU, or
torchrun over machines x GPUs with the parameters sharded inside a machine and
PowerSGD across machines (`parallel=ParallelConfig(...)`, dalle_core.distributed).

What each step does
-------------------
- loss = 1/8 text + 7/8 image cross-entropy (`DalleTransformer.loss`), under
  autocast per `precision`:
    "fp32"               no autocast (CPU tests);
    "bf16"               autocast bf16, no gradient scaling;
    "auto" (amp_dtype)   bf16 where the device has fast bf16 (GPUs from Ampere,
                         CPUs with AVX-512 BF16 / AMX), fp16 on older GPUs,
                         fp32 elsewhere (dalle_core.precision.device);
    "fp16-per-resblock"  autocast fp16 with the paper's per-resblock gradient
                         scaling (`dalle_core.precision`): one scale per
                         resblock, non-finite gradients filtered per block and
                         that block's update skipped, its scale divided at
                         most once per 125 updates. Meant for
                         GPUs; CPU fp16 autocast works but is slow.
- AdamW with the paper's hyper-parameters (betas 0.9 / 0.96, eps 1e-8, weight
  decay 4.5e-2 on the weight matrices only: `build_optimizer`); the laptop
  profiles put the resblocks' matrices on Muon instead (`training.optimizer`,
  not the paper's: dalle_core/muon.py);
- learning rate: linear warm-up to `training.lr` over `training.warmup_steps`, then
  constant, halved (x `lr_plateau_factor`) each time the training loss
  plateaus, at most `lr_max_decays` times (the paper: 5 over 430k updates). The
  plateau detector (`dalle_core.prior.lr_schedule`, thresholds `lr_plateau_*`)
  fits the smoothed loss against log-steps, so a large run's slow steady gains
  are not a plateau; an operator can force or hold a decay on the running job
  (`dalle lr decay|hold|release --run-dir DIR` writes DIR/lr_control.json, read
  at each log interval); each decision is an ``lr_schedule`` event and is kept
  in the checkpoints. The tiny/small profiles (tests, demo) see no decay;
- gradient norm clipped at `training.grad_clip` (4) during warm-up, as in the paper;
- EMA of the weights (decay `ema_decay` every `ema_every` updates);
- logs (rank 0 only, through `on_log`): loss total / text / image (the mean over
  all ranks), lr, grad norm, tokens/s, gradient-scale statistics, cross-machine
  bytes and measured PowerSGD compression;
- checkpoints every `checkpoint_every` updates and at the end
  (dalle_core.distributed.checkpoint: sharded DCP, atomic), holding model,
  optimizer, EMA, step, scaler, lr schedule, RNG, PowerSGD buffers and the data
  position (the step: ``batches_fn(step)`` restarts the data there). A run
  resumes from its latest checkpoint to the same result as a run never
  interrupted (tested, single process and 4 ranks).

At the end the model is written in `model.save_prior`'s format (one file, config
pinned inside, weights and EMA weights; `export.save_prior_rank0`: full copies
gathered to rank 0 only); `model.load_prior` reads it back into a
`DalleTransformer` of the pinned shape whatever today's defaults are.

Launch (one machine, 4 processes as 2 "machines" x 2 "GPUs" on CPU):

    torchrun --standalone --nproc-per-node 4 -m dalle_core.prior.train \\
        --profile-json RUN/profile.json --codes DIR --out DIR --nodes 2 --gpus-per-node 2 \\
        --powersgd-rank 4 --steps 50

`--profile-json` is the resolved profile every launcher writes with
`dalle_core.profiles.write_resolved_profile` (`dalle resolve-profile`);
`--profile NAME` resolves the named profile against the codes' manifest the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dalle_core.distributed.checkpoint import (canonical_key, checkpoint_location, load_latest, read_latest_meta,
                                               save_checkpoint)
from dalle_core.distributed.mesh import (
    ParallelConfig,
    barrier,
    build_mesh,
    data_parallel_replicas,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
)
from dalle_core.distributed.parallelize import ParallelSetup, parallelize_prior
from dalle_core.muon import LR_RATIO
from dalle_core.precision.device import resolve_amp_dtype
from dalle_core.precision.grad_scaling import PerResblockGradScaler, apply_per_resblock_grad_scaling

from .config import ATTENTION_CHOICES, SHAPE_FIELDS, PriorConfig, PriorTrainingConfig
from .init import materialize_prior
from .lr_schedule import CONTROL_FILE, LRSchedule, poll_lr_requests
from .export import save_prior_rank0
from .model import DalleTransformer, build_optimizer
from ..heap import freed_heap_kept, keep_freed_heap

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16-per-resblock", "bf16")


def resolve_precision(precision: str | None, config: PriorTrainingConfig,
                      device: torch.device | str = "cpu") -> str:
    """The precision a run trains in: the argument, else the config's amp_dtype ("auto":
    what pays on `device`, dalle_core.precision.device)."""
    if precision is None or precision == "auto":
        amp = resolve_amp_dtype(config.amp_dtype if precision is None else "auto", device)
        precision = {"fp16": "fp16-per-resblock", "bf16": "bf16", "fp32": "fp32"}[amp]
    if precision == "fp16":
        precision = "fp16-per-resblock"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


# (learning rate: LRSchedule in dalle_core.prior.lr_schedule)

# --- EMA ------------------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of the parameters (sharded like them under FSDP),
    keyed by canonical parameter names."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        self.decay, self.every = float(decay), max(1, int(every))
        self.shadow: dict[str, torch.Tensor] = {
            canonical_key(n): p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        for n, p in model.named_parameters():
            _local(self.shadow[canonical_key(n)]).lerp_(_local(p.detach()), 1.0 - self.decay)


# --- gradient norm -----------------------------------------------------------------------------

def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient 2-norm over all ranks (FSDP's DTensor gradients included);
    clips to `max_norm` when given. Returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_([p for p in parameters if p.grad is not None], max_norm, total)
    return total


# --- the result --------------------------------------------------------------------------------------

@dataclass
class PriorTrainResult:
    steps: int  # updates done in total (the last step reached)
    start_step: int  # where this call started (0, or the resumed checkpoint's step)
    resumed_from: int | None
    losses: list[float]  # mean loss over ranks of every update done by this call
    final_loss: float | None
    history: list[dict] = field(default_factory=list)  # the records passed to on_log
    checkpoint: str | None = None  # last checkpoint directory
    model_path: str | None = None  # save_prior file
    elapsed_s: float = 0.0
    precision: str = "fp32"
    world_size: int = 1
    compression: dict | None = None  # cross-machine bytes / measured PowerSGD compression
    model: nn.Module | None = field(default=None, repr=False)
    ema: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model")
        d.pop("ema")
        return d


# --- training ---------------------------------------------------------------------------------------------

def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state(device: torch.device) -> dict[str, Any]:
    s: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if "python" in s:
        random.setstate(s["python"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def train_prior(
    config: PriorConfig,
    training: PriorTrainingConfig,
    batches_fn: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    checkpoint_dir: str | Path,
    on_log: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
    precision: str | None = "fp32",
    total_steps: int | None = None,
    parallel: ParallelConfig | None = None,
    *,
    log_every: int | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 3,
    resume: bool = True,
    stop_after: int | None = None,
    after_step: Callable[[int], None] | None = None,
    seed: int | None = None,
    plateau_window: int | None = None,
    lr_control: str | Path | None | bool = None,
    clip_after_warmup: bool = False,
    save_final: bool = True,
    model_filename: str = "prior.pt",
) -> PriorTrainResult:
    """Train (or resume training) the prior; see the module docstring.

    batches_fn(k) -> iterator of (text [b, L], image [b, N]) LongTensors whose
    first item is global batch k; under `parallel` each rank's slice of the
    global batch (`dalle_core.prior.data.code_batches` does both).
    `stop_after`: return after that many updates (with a checkpoint), as if
    interrupted; `after_step(step)`: called on every rank after each update (and
    its checkpoint). Collective under `parallel`: every rank calls it.
    """
    t_start = time.time()
    precision = resolve_precision(precision, training, device)
    total = int(total_steps if total_steps is not None else training.total_steps)
    log_every = int(log_every or training.log_every)
    checkpoint_every = int(checkpoint_every or training.checkpoint_every)
    seed = training.seed if seed is None else int(seed)
    # a local directory, or a URL (s3://bucket/prefix, any fsspec URL): dalle_core.distributed.checkpoint
    checkpoint_dir = checkpoint_location(checkpoint_dir)
    device = torch.device(device)

    # --- processes, mesh --------------------------------------------------------------------
    mesh = None
    if parallel is not None and (parallel.world_size > 1 or is_distributed()):
        info = init_distributed()
        if device.type == "cuda":
            device = info.device
        mesh = build_mesh(parallel, device.type)
    rank, world = get_rank(), get_world_size()

    # --- model, precision, parallelism, optimizer ------------------------------------------------
    # Built on the meta device (no memory), wrapped and sharded, then each rank
    # fills only its own shards from per-parameter seeded generators
    # (dalle_core.prior.init): the same model for any world size, and no rank
    # ever holds the whole model (4 bytes x 12.3B = 49 GB at paper-12B).
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = DalleTransformer(config)
    scaler = None
    if precision == "fp16-per-resblock" and training.per_resblock_grad_scaling:
        # M = data-parallel replicas (machines of the mesh), not the world size;
        # the scaler multiplies by s / M since each rank's loss is a local mean
        # and every reduction averages (see dalle_core.precision.grad_scaling).
        scaler = PerResblockGradScaler(list(model.resblocks()), n_data_parallel=data_parallel_replicas(mesh))
        apply_per_resblock_grad_scaling(model, scaler)
    setup: ParallelSetup = parallelize_prior(model, mesh, parallel or ParallelConfig(), grad_scaler=scaler,
                                             powersgd_variant=training.powersgd_variant)
    materialize_prior(model, device, seed, config)
    reducer = setup.reducer
    optimizer = build_optimizer(model, training)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMA(model, training.ema_decay, training.ema_every)
    schedule = LRSchedule.from_config(training, window=plateau_window, total_steps=total)
    # the operator's control file (default CHECKPOINT_DIR/lr_control.json; False: none), read on rank 0
    # (none by default when the checkpoints live behind a URL: the file is read from a local directory)
    remote_checkpoints = not isinstance(checkpoint_dir, Path)
    control_path = (None if lr_control is False or (remote_checkpoints and not lr_control)
                    else Path(lr_control or checkpoint_dir / CONTROL_FILE))
    control_storage = None
    if control_path is not None and rank == 0:
        from dalle_core.storage import LocalStorage

        control_storage = LocalStorage(control_path.parent)

    # --- resume ------------------------------------------------------------------------------------
    start, resumed_from = 0, None
    if resume:
        # Refuse a checkpoint of another shape before touching any tensor.
        saved_meta = (read_latest_meta(checkpoint_dir) or {}).get("meta") or {}
        saved = saved_meta.get("config") or {}
        diff = {k: (saved.get(k), getattr(config, k)) for k in SHAPE_FIELDS
                if k in saved and saved.get(k) != getattr(config, k)}
        if diff:
            raise ValueError(f"checkpoint in {checkpoint_dir} has another model shape (saved, now): {diff}")
        # ... or of another optimizer: its state would not fit (an old checkpoint without the
        # field was written by AdamW, the paper's and then the only one)
        saved_opt = (saved_meta.get("training") or {}).get("optimizer", "adamw")
        if saved_meta and saved_opt != training.optimizer:
            raise ValueError(f"checkpoint in {checkpoint_dir} was trained with optimizer {saved_opt!r}, this run "
                             f"asks for {training.optimizer!r}: resume with {saved_opt!r} or use another folder")
        extra: dict[str, Any] = {"state": {"ema": ema.shadow}}
        step0 = load_latest(checkpoint_dir, model, optimizer, extra)
        if step0 is not None:
            meta = extra.get("meta") or {}
            ema.shadow = extra["state"]["ema"]
            schedule.load_state_dict(meta.get("schedule", {}))
            if scaler is not None and meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            rank_state = extra.get("rank") or {}
            if rank_state.get("rng") is not None:
                _set_rng_state(rank_state["rng"], device)
            if reducer is not None and rank_state.get("reducer") is not None:
                rs = rank_state["reducer"]
                for k in ("errors", "qs"):
                    if k in rs:
                        rs[k] = {n: t.to(device) for n, t in rs[k].items()}
                reducer.load_state_dict(rs)
            start = resumed_from = step0
            if rank == 0:
                log.info("resumed from %s at step %d", checkpoint_dir, step0)

    def emit(record: dict) -> None:
        if rank == 0:
            history.append(record)
            if on_log is not None:
                on_log(record)

    history: list[dict] = []
    losses: list[float] = []
    last_ckpt: str | None = None

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        rank_state = {"rng": _rng_state(device), "reducer": reducer.state_dict() if reducer else None}
        meta = {"config": config.to_dict(), "training": training.to_dict(), "precision": precision, "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "data": {"next_batch": step, "seed": seed},
                "parallel": parallel.to_dict() if parallel is not None else None}
        path = save_checkpoint(checkpoint_dir, step, model, optimizer,
                               {"state": {"ema": ema.shadow}, "meta": meta, "rank": rank_state},
                               keep=keep_checkpoints)
        last_ckpt = str(path)
        emit({"event": "checkpoint", "step": step, "path": str(path)})

    emit({"event": "start", "step": start, "total_steps": total, "world_size": world,
          "precision": precision, "resumed_from": resumed_from,
          "n_params": sum(p.numel() for p in params), "freed_heap_kept": freed_heap_kept()})

    # --- the loop ------------------------------------------------------------------------------------
    model.train()
    step = start
    window_t, window_tokens, window_losses = time.time(), 0, []
    if start < total:
        batches = batches_fn(start)
        for step in range(start, total):
            text, image = next(batches)
            text = text.to(device, non_blocking=True)
            image = image.to(device, non_blocking=True)
            lr = schedule.lr_at(step)
            for g in optimizer.param_groups:  # Muon's groups move lr_ratio x as fast (dalle_core/muon.py)
                g["lr"] = lr * g.get(LR_RATIO, 1.0)
            with _autocast(precision, device):
                out = model.loss(text, image)
            out["total"].backward()
            if reducer is not None:
                reducer.end_step()
            if scaler is not None:
                scaler.unscale_(optimizer)
            clipping = training.grad_clip > 0 and (step < training.warmup_steps or clip_after_warmup)
            clip = training.grad_clip if clipping else None
            grad_norm = clip_grad_norm(params, clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            ema.update(model, done)

            vals = torch.stack([out[k].detach().float() for k in ("total", "text", "image")])
            if world > 1:
                torch.distributed.all_reduce(vals)
                vals /= world
            loss_total, loss_text, loss_image = vals.tolist()
            if scaler is None and not math.isfinite(loss_total):  # the same on every rank: all-reduced
                raise FloatingPointError(
                    f"non-finite loss {loss_total} at update {done} ({precision}); the last checkpoint is "
                    f"{last_ckpt or 'none from this call'} — lower the learning rate or use fp32")
            lr_decisions = schedule.observe(done, loss_total)
            if control_path is not None and (done % log_every == 0 or done == start + 1):
                lr_decisions += schedule.apply_requests(done, poll_lr_requests(control_storage, control_path.name))
            for d in lr_decisions:
                emit({"event": "lr_schedule", **d})
            losses.append(loss_total)
            window_losses.append(loss_total)
            window_tokens += text.shape[0] * world * config.seq_len

            if done % log_every == 0 or done == total or done == start + 1:
                now = time.time()
                rec = {"event": "log", "step": done, "loss": loss_total, "loss_text": loss_text,
                       "loss_image": loss_image, "loss_avg": sum(window_losses) / len(window_losses),
                       "lr": lr, "grad_norm": float(grad_norm), "grad_clip": clip,
                       "tokens_per_s": window_tokens / max(now - window_t, 1e-9)}
                if scaler is not None:
                    rec.update(scaler.stats())
                    rec["grad_scale_last_step_skipped"] = scaler.last_step_skipped
                if reducer is not None:
                    rec.update(reducer.stats())
                emit(rec)
                window_t, window_tokens, window_losses = now, 0, []
            stopping = stop_after is not None and done >= stop_after
            if done % checkpoint_every == 0 or done == total or stopping:
                checkpoint(done)
            if after_step is not None:
                after_step(done)
            if stopping:
                break
        step = done

    # --- the end -------------------------------------------------------------------------------------
    if last_ckpt is None and step > 0 and resumed_from != step:
        checkpoint(step)
    model_path = None
    if save_final and step >= total:
        meta = {"steps": step, "precision": precision, "world_size": world,
                "final_loss": losses[-1] if losses else None,
                # what the sampler needs to know: guidance needs a prior that learnt the empty caption
                "caption_dropout": training.caption_dropout}
        # model.save_prior's file, but the full weights and EMA are gathered to rank 0 only
        if remote_checkpoints:
            model_path = _save_prior_to_url(f"{checkpoint_dir}/{model_filename}", model, config, ema.shadow, meta)
        else:
            model_path = save_prior_rank0(checkpoint_dir / model_filename, model, config, ema.shadow, meta=meta)[0]
    result = PriorTrainResult(
        steps=step, start_step=start, resumed_from=resumed_from, losses=losses,
        final_loss=losses[-1] if losses else None, history=history, checkpoint=last_ckpt,
        model_path=str(model_path) if model_path else None, elapsed_s=time.time() - t_start,
        precision=precision, world_size=world, compression=reducer.stats() if reducer else None,
        model=model, ema=ema.shadow)
    # start_step: 0 for a run trained from the start, the checkpoint's step for a resumed one (equal to
    # `step` when a finished run was only loaded back)
    emit({"event": "end", "step": step, "start_step": start, "final_loss": result.final_loss,
          "elapsed_s": result.elapsed_s, "freed_heap_kept": freed_heap_kept(),  # a condition of elapsed_s
          "model_path": result.model_path, **({"compression": result.compression} if reducer else {})})
    return result


def _save_prior_to_url(url: str, model: nn.Module, config: PriorConfig, ema: dict, meta: dict) -> str | None:
    """save_prior into a local temporary file, uploaded by rank 0 (collective, like save_prior)."""
    import tempfile

    from dalle_core.distributed.objectstore import url_filesystem

    with tempfile.TemporaryDirectory(prefix="dalle-prior-") as tmp:
        local = save_prior_rank0(Path(tmp) / "prior.pt", model, config, ema, meta=meta)[0]
        if local is None:
            return None
        fs, path = url_filesystem(url)
        fs.put_file(str(local), path)
    return url


# --- command line (torchrun entry point) -------------------------------------------------------------------

def _codes_location(path: str) -> tuple[Any, str]:
    from dalle_core.storage import LocalStorage

    p = Path(path).resolve()
    if (p / "manifest.json").is_file():
        return LocalStorage(p.parent), p.name
    if (p / "image_codes" / "manifest.json").is_file():
        return LocalStorage(p), "image_codes"
    raise FileNotFoundError(f"no image-code manifest in {p} or {p / 'image_codes'}")


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dalle_core.prior.train",
                                 description="Train the DALL-E prior on image-code shards "
                                             "(single process, or under torchrun).")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile-json", default=None,
                       help="the resolved profile every launcher writes (dalle_core.profiles.write_resolved_profile, "
                            "`dalle resolve-profile`); checked against the codes' manifest")
    which.add_argument("--profile", default=None,
                       help="a profile name (tiny, small, paper-1.3B, paper-12B), resolved against the codes' manifest")
    ap.add_argument("--codes", required=True, help="directory with the image-code manifest.json and shards "
                                                   "(or a storage root holding image_codes/)")
    ap.add_argument("--out", required=True, help="checkpoint / output directory (shared by all ranks), or a URL: "
                    "s3://bucket/prefix (then give --metrics)")
    ap.add_argument("--steps", type=int, default=None, help="total updates (default: the profile's)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: the profile's)")
    ap.add_argument("--precision", default=None, choices=(*PRECISIONS, "auto"))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--keep-checkpoints", type=int, default=3)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--lr-cooldown-steps", type=int, default=None,
                    help="the rate falls linearly to 0 over the run's last N updates (not the paper's; default: the profile's)")
    ap.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                    help="how attention is computed (same outputs; default: the profile's): PriorConfig.attention")
    ap.add_argument("--data-split", default="auto", choices=("auto", "sample", "shard"))
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--tokenizer", default=None,
                    help="the tokenizer file the codes were encoded with: captions are encoded again per batch "
                         "with the config's BPE dropout (default: found next to the codes, see "
                         "dalle_core.prior.data.prior_tokenizer; none found: the stored ids, no dropout)")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument("--powersgd-rank", type=int, default=None)
    ap.add_argument("--powersgd-variant", default=None, choices=("torch", "paper"),
                    help="PowerSGD variant (default: the profile's powersgd_variant)")
    ap.add_argument("--powersgd-orthogonalization", default=None, choices=("gram_schmidt", "householder"))
    ap.add_argument("--powersgd-min-compression-rate", type=float, default=2.0)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--metrics", default=None, help="JSON-lines metrics file (rank 0; default OUT/metrics.jsonl)")
    ap.add_argument("--quiet", action="store_true", help="do not echo metrics to stdout")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--crash-after-step", type=int, default=None,
                    help="fault injection: after this update (and its checkpoint) exit hard with os._exit")
    ap.add_argument("--crash-rank", type=int, default=None, help="which rank crashes (default: the last)")
    return ap


def main(argv: list[str] | None = None, extra_on_log: Callable[[dict], None] | None = None) -> int:
    """The torchrun entry point; `extra_on_log` (rank 0) lets a caller forward metrics elsewhere."""
    from .data import code_batches, code_shards, prior_tokenizer

    from dalle_core.data.shards import Manifest
    from dalle_core.profiles import check_profile_against_codes, get_profile, load_resolved_profile

    args = build_arg_parser().parse_args(argv)
    keep_freed_heap()  # each update reuses the last one's pages (dalle_core/heap.py: ~13% of a CPU update)
    # a rank killed by a signal (SIGABRT from a C++ std::terminate, SIGSEGV) prints every
    # thread's Python stack: torchrun itself reports only "Signal 6 received by PID ..."
    faulthandler.enable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    storage, prefix = _codes_location(args.codes)
    profile = load_resolved_profile(args.profile_json) if args.profile_json else get_profile(args.profile)
    check_profile_against_codes(profile, Manifest.load(storage, prefix), storage.uri(f"{prefix}/manifest.json"))
    config, training = profile.prior, profile.prior_training
    changes = {k: v for k, v in {"batch_size": args.batch_size, "lr": args.lr,
                                 "warmup_steps": args.warmup_steps,
                                 "lr_cooldown_steps": args.lr_cooldown_steps}.items() if v is not None}
    if changes:
        training = training.replace(**changes)
    if args.attention is not None:
        config = config.replace(attention=args.attention)

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = None
    if env_world > 1 or args.nodes or args.gpus_per_node:
        gpus = args.gpus_per_node or int(os.environ.get("DALLE_GPUS_PER_NODE", 0)) or \
            int(os.environ.get("LOCAL_WORLD_SIZE", env_world))
        nodes = args.nodes or max(1, env_world // gpus)
        parallel = ParallelConfig(nodes=nodes, gpus_per_node=gpus, powersgd_rank=args.powersgd_rank,
                                  activation_checkpointing=args.activation_checkpointing,
                                  prefetch=not args.no_prefetch,
                                  powersgd_variant=args.powersgd_variant,
                                  powersgd_orthogonalization=args.powersgd_orthogonalization,
                                  powersgd_min_compression_rate=args.powersgd_min_compression_rate,
                                  powersgd_seed=args.seed if args.seed is not None else training.seed)
        if parallel.world_size != env_world:
            raise SystemExit(f"--nodes {nodes} x --gpus-per-node {gpus} = {parallel.world_size} ranks, "
                             f"but torchrun started {env_world}")
    elif args.activation_checkpointing:
        parallel = ParallelConfig(activation_checkpointing=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if parallel is not None and parallel.world_size > 1:
        init_distributed()
    rank, world = get_rank(), get_world_size()

    paths, counts = code_shards(storage, prefix)
    tokenizer = (prior_tokenizer(storage, prefix, config.text_len, config.text_vocab_size, args.tokenizer)
                 if training.bpe_dropout > 0 else None)
    seed = training.seed if args.seed is None else args.seed

    def batches_fn(start: int):
        return code_batches(paths, training.batch_size, seed, start_step=start, rank=rank, world_size=world,
                            split=args.data_split, shuffle_buffer=args.shuffle_buffer, counts=counts,
                            tokenizer=tokenizer, bpe_dropout=training.bpe_dropout if tokenizer is not None else 0.0,
                            caption_dropout=training.caption_dropout, text_vocab_size=config.text_vocab_size)

    out = checkpoint_location(args.out)  # a local directory or a URL (s3://bucket/prefix)
    if not isinstance(out, Path) and not args.metrics:
        raise SystemExit(f"--out {args.out} is a URL: give --metrics, a local file for the metrics")
    metrics_path = Path(args.metrics) if args.metrics else out / "metrics.jsonl"
    metrics_file = None
    if rank == 0:
        if isinstance(out, Path):
            out.mkdir(parents=True, exist_ok=True)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics_path, "a")

    def on_log(record: dict) -> None:  # rank 0 only
        line = json.dumps(record, default=str)
        metrics_file.write(line + "\n")
        metrics_file.flush()
        if not args.quiet:
            print(line, flush=True)
        if extra_on_log is not None:
            extra_on_log(record)

    crash_rank = args.crash_rank if args.crash_rank is not None else world - 1

    def after_step(step: int) -> None:
        if args.crash_after_step is not None and step == args.crash_after_step and rank == crash_rank:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)  # a hard kill of this rank: no cleanup, no destroy_process_group

    try:
        train_prior(config, training, batches_fn, out, on_log=on_log, device=device, precision=args.precision,
                    total_steps=args.steps, parallel=parallel, log_every=args.log_every,
                    checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                    resume=not args.no_resume, after_step=after_step, seed=seed)
        if is_distributed():
            barrier()  # no rank tears its process groups down while another still talks to it
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if is_distributed():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
