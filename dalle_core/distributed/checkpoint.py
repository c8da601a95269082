"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout of a checkpoint directory:

    step-00000100/            one complete checkpoint
        .metadata, __*.distcp DCP: model + optimizer (+ extra tensors, e.g. the EMA),
                              each rank writing its own shards (DTensors under FSDP)
        rank-00000.pt ...     per-rank state that is not sharded tensors: RNG
                              states, PowerSGD error-feedback / warm-start buffers
        meta.json             written last: step, world size, the run's metadata
                              (config, scaler, lr schedule, data position)
    step-00000200.tmp/        a checkpoint being written (or abandoned by a crash)

Atomicity: every rank writes into ``step-N.tmp``; after a barrier rank 0 writes
meta.json and renames the directory to ``step-N`` (a rename is atomic on a POSIX
file system); a second barrier tells every rank it is done. `load_latest` only
considers directories without the ``.tmp`` suffix that have a meta.json, so a
run killed at any moment — one rank killed mid-save included — resumes from the
last complete checkpoint. The directory must be on a file system every rank
sees (one machine, or a shared FS across machines).

Model and optimizer state go through `get_state_dict` / `set_state_dict`
(torch.distributed.checkpoint.state_dict), so a checkpoint is keyed by parameter
names, not by sharding: it loads into a different number of ranks (DCP
reshards) and into a single process. Keys are saved in a canonical form
without the wrappers' infixes (``resblock.`` of per-resblock gradient scaling,
``_checkpoint_wrapped_module.``), so runs with and without those wrappers
resume from each other's checkpoints.

The caller's ``extra`` dict has up to three parts:

    extra["state"]  nested dict of tensors / DTensors, saved and loaded by DCP
                    (loaded in place: pass same-shaped tensors to load into)
    extra["meta"]   JSON-serialisable dict (rank 0's is saved)
    extra["rank"]   anything `torch.save` can write with weights_only loading,
                    one per rank (restored only when the world size matches)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .mesh import barrier, get_rank, get_world_size, is_distributed

log = logging.getLogger(__name__)

FORMAT = "dalle-checkpoint/1"
_STEP_RE = re.compile(r"^step-(\d+)$")
_INFIXES = ("._checkpoint_wrapped_module", ".resblock")


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def canonical_key(key: str) -> str:
    for infix in _INFIXES:
        key = key.replace(infix + ".", ".")
    return key


def _canon_model(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    out, back = {}, {}
    for k, v in sd.items():
        c = canonical_key(k)
        out[c] = v
        back[c] = k
    return out, back


def _canon_optim(osd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    back: dict[str, str] = {}
    state = {}
    for k, v in osd.get("state", {}).items():
        c = canonical_key(k)
        back[c] = k
        state[c] = v
    groups = []
    for g in osd.get("param_groups", []):
        g = dict(g)
        params = []
        for k in g.get("params", []):
            c = canonical_key(k) if isinstance(k, str) else k
            if isinstance(k, str):
                back[c] = k
            params.append(c)
        g["params"] = params
        groups.append(g)
    return {"state": state, "param_groups": groups}, back


def _uncanon_model(sd: dict[str, Any], back: dict[str, str]) -> dict[str, Any]:
    return {back.get(k, k): v for k, v in sd.items()}


def _uncanon_optim(osd: dict[str, Any], back: dict[str, str]) -> dict[str, Any]:
    state = {back.get(k, k): v for k, v in osd["state"].items()}
    groups = []
    for g in osd["param_groups"]:
        g = dict(g)
        g["params"] = [back.get(k, k) if isinstance(k, str) else k for k in g["params"]]
        groups.append(g)
    return {"state": state, "param_groups": groups}


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_step(directory: str | Path) -> int | None:
    cps = list_checkpoints(directory)
    return cps[-1][0] if cps else None


@contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes the intent is to save in a single process"
    # when no process group exists: that is the intent here.
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def read_latest_meta(directory: str | Path) -> dict[str, Any] | None:
    """meta.json of the newest complete checkpoint (None when there is none):
    lets a caller check compatibility before loading any tensor."""
    cps = list_checkpoints(directory)
    if not cps:
        return None
    return json.loads((cps[-1][1] / "meta.json").read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, extra: dict[str, Any] | None = None,
                    *, keep: int | None = 3) -> Path:
    """Write checkpoint `step` atomically (see module docstring). Collective:
    every rank calls it. Keeps the newest `keep` checkpoints (None = all).
    Returns the final directory."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    rank, world = get_rank(), get_world_size()
    final = directory / step_dirname(step)
    tmp = directory / (step_dirname(step) + ".tmp")
    extra = extra or {}
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()

    msd, osd = _state_dicts(model, optimizer)
    state: dict[str, Any] = {"model": _canon_model(msd)[0]}
    if osd is not None:
        state["optim"] = _canon_optim(osd)[0]
    if extra.get("state"):
        state["extra"] = extra["state"]
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
    if extra.get("rank") is not None:
        torch.save(extra["rank"], tmp / f"rank-{rank:05d}.pt")
    barrier()

    if rank == 0:
        meta = {"format": FORMAT, "step": int(step), "world_size": world,
                "has_optimizer": osd is not None, "meta": extra.get("meta") or {}}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
        if keep is not None and keep > 0:
            for _, old in list_checkpoints(directory)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        for p in directory.glob("step-*.tmp"):  # abandoned by earlier crashes
            m = re.match(r"^step-(\d+)\.tmp$", p.name)
            if m and int(m.group(1)) < step:
                shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def load_latest(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                extra: dict[str, Any] | None = None) -> int | None:
    """Load the newest complete checkpoint under `directory` into `model`,
    `optimizer` and `extra` (see module docstring: "state" in place, "meta"
    and "rank" replaced). Returns its step, or None when there is none.
    Collective: every rank calls it; rank 0 picks the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    rank, world = get_rank(), get_world_size()
    chosen: list[Any] = [None]
    if rank == 0:
        cps = list_checkpoints(directory)
        chosen[0] = str(cps[-1][1]) if cps else None
    if is_distributed():
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None
    path = Path(chosen[0])
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a checkpoint of format {FORMAT} (got {meta.get('format')!r})")

    msd, osd = _state_dicts(model, optimizer)
    cmsd, mback = _canon_model(msd)
    state: dict[str, Any] = {"model": cmsd}
    if osd is not None:
        if not meta.get("has_optimizer", True):
            raise ValueError(f"{path} holds no optimizer state")
        cosd, oback = _canon_optim(osd)
        state["optim"] = cosd
    if extra is not None and extra.get("state"):
        state["extra"] = extra["state"]
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
    if osd is not None:
        set_state_dict(model, optimizer, model_state_dict=_uncanon_model(state["model"], mback),
                       optim_state_dict=_uncanon_optim(state["optim"], oback))
    else:
        set_model_state_dict(model, _uncanon_model(state["model"], mback))

    if extra is not None:
        if "extra" in state:
            extra["state"] = state["extra"]
        extra["meta"] = meta.get("meta", {})
        rank_file = path / f"rank-{rank:05d}.pt"
        if int(meta.get("world_size", -1)) == world and rank_file.is_file():
            extra["rank"] = torch.load(rank_file, map_location="cpu", weights_only=True)
        else:
            if int(meta.get("world_size", -1)) != world:
                log.warning("checkpoint %s was written by %s ranks, this run has %s: per-rank state "
                            "(RNG, PowerSGD buffers) starts fresh", path, meta.get("world_size"), world)
            extra["rank"] = None
    return int(meta["step"])


__all__ = ["FORMAT", "canonical_key", "latest_step", "list_checkpoints", "load_latest", "read_latest_meta",
           "save_checkpoint", "step_dirname"]
