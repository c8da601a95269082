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

The directory may also be a URL: ``s3://bucket/prefix`` (the platform's S3
settings: ``DALLE_S3_ENDPOINT_URL``, credentials from the environment) or any
fsspec URL (``file://`` is a local path). Object stores have no atomic
directory rename, so there every rank writes straight into ``step-N/`` and the
checkpoint is complete once rank 0 has written meta.json, after a barrier that
follows DCP's own ``.metadata`` (written last by DCP). `list_checkpoints`
counts only ``step-N`` with both meta.json and ``.metadata`` (locally too), so a
checkpoint cut short by a kill is ignored on resume, and removed by the next
save; deleting one removes its meta.json first.

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
import io
import os
import posixpath
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .mesh import barrier, get_rank, get_world_size, is_distributed
from .objectstore import dcp_reader, dcp_writer, is_url, join, url_filesystem

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


def checkpoint_location(directory: str | Path) -> Path | str:
    """A local Path, or a URL string (``s3://...``, any fsspec URL) without its trailing slash.
    ``file://`` URLs are local paths."""
    if isinstance(directory, Path):
        return directory
    s = str(directory)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return s.rstrip("/") if is_url(s) else Path(s)


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path | str]]:
    """Complete checkpoints under `directory`, oldest first (Paths locally, URLs otherwise)."""
    loc = checkpoint_location(directory)
    if not isinstance(loc, Path):
        return _remote_checkpoints(loc)
    d = loc
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _remote_step_dirs(url: str) -> tuple[Any, list[tuple[int, str, bool]]]:
    """(fs, [(step, path in fs, complete)]) of the ``step-N`` prefixes under `url`."""
    fs, root = url_filesystem(url)
    out = []
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        entries = []
    for name in entries:
        m = _STEP_RE.match(posixpath.basename(name.rstrip("/")))
        if m:
            p = name.rstrip("/")
            complete = fs.exists(join(p, "meta.json")) and fs.exists(join(p, ".metadata"))
            out.append((int(m.group(1)), p, complete))
    return fs, sorted(out)


def _remote_checkpoints(url: str) -> list[tuple[int, str]]:
    fs, dirs = _remote_step_dirs(url)
    return [(step, _unstrip(fs, p, url)) for step, p, complete in dirs if complete]


def _unstrip(fs: Any, path: str, url: str) -> str:
    proto = url.split("://", 1)[0]
    return f"{proto}://{fs._strip_protocol(path)}"


def _remote_rm_checkpoint(fs: Any, path: str) -> None:
    # meta.json first: a delete cut short leaves an incomplete (ignored) checkpoint
    for marker in ("meta.json", ".metadata"):
        try:
            if fs.exists(join(path, marker)):
                fs.rm(join(path, marker))
        except FileNotFoundError:
            pass
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


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
    return _read_meta(cps[-1][1])


def _read_meta(path: Path | str) -> dict[str, Any]:
    if isinstance(path, Path):
        return json.loads((path / "meta.json").read_text())
    fs, p = url_filesystem(path)
    return json.loads(fs.cat_file(join(p, "meta.json")).decode())


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
    return get_state_dict(model, _optimizers(optimizer))


def _optimizers(optimizer: Any) -> Any:
    """What DCP takes: an optimizer, or the list inside a container of several
    (dalle_core.muon.MuonWithAdamW: one state dict keyed by parameter name)."""
    return list(getattr(optimizer, "optimizers", None) or [optimizer])


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, extra: dict[str, Any] | None = None,
                    *, keep: int | None = 3) -> Path | str:
    """Write checkpoint `step` atomically (see module docstring). Collective:
    every rank calls it. Keeps the newest `keep` checkpoints (None = all).
    Returns the final directory."""
    import torch.distributed.checkpoint as dcp

    loc = checkpoint_location(directory)
    if not isinstance(loc, Path):
        return _save_remote(loc, step, model, optimizer, extra, keep=keep)
    directory = loc
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

    state, osd = _checkpoint_state(model, optimizer, extra)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
    if extra.get("rank") is not None:
        torch.save(extra["rank"], tmp / f"rank-{rank:05d}.pt")
    barrier()

    if rank == 0:
        meta = _meta(step, world, osd, extra)
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


def _checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      extra: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(what DCP writes: canonical model, optimizer and extra state; the optimizer state
    dict or None), the same for a local folder and an object store."""
    msd, osd = _state_dicts(model, optimizer)
    state: dict[str, Any] = {"model": _canon_model(msd)[0]}
    if osd is not None:
        state["optim"] = _canon_optim(osd)[0]
    if extra.get("state"):
        state["extra"] = extra["state"]
    return state, osd


def _meta(step: int, world: int, osd: Any, extra: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "step": int(step), "world_size": world,
            "has_optimizer": osd is not None, "meta": extra.get("meta") or {}}


def _save_remote(url: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 extra: dict[str, Any] | None, *, keep: int | None) -> str:
    """save_checkpoint into an object store / fsspec URL: straight into ``step-N/``,
    complete once meta.json is there (see the module docstring)."""
    import torch.distributed.checkpoint as dcp

    rank, world = get_rank(), get_world_size()
    extra = extra or {}
    fs, root = url_filesystem(url)
    final = join(root, step_dirname(step))
    if rank == 0:
        fs.makedirs(root, exist_ok=True)
        _remote_rm_checkpoint(fs, final)  # the same step saved again, or left incomplete by a crash
        fs.makedirs(final, exist_ok=True)
    barrier()

    state, osd = _checkpoint_state(model, optimizer, extra)
    with _quiet_single_process():
        dcp.save(state, storage_writer=dcp_writer(fs, final), no_dist=not is_distributed())
    if extra.get("rank") is not None:
        buf = io.BytesIO()
        torch.save(extra["rank"], buf)
        fs.pipe_file(join(final, f"rank-{rank:05d}.pt"), buf.getvalue())
    barrier()  # every rank's shards and DCP's .metadata are written

    if rank == 0:
        meta = _meta(step, world, osd, extra)
        fs.pipe_file(join(final, "meta.json"), json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
        _, dirs = _remote_step_dirs(url)
        complete = [p for _, p, ok in dirs if ok]
        if keep is not None and keep > 0:
            for old in complete[:-keep]:
                _remote_rm_checkpoint(fs, old)
        for n, p, ok in dirs:  # abandoned by earlier crashes
            if not ok and n < step:
                _remote_rm_checkpoint(fs, p)
    barrier()
    return _unstrip(fs, final, url)


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
    remote = is_url(chosen[0])
    path: Path | str = chosen[0] if remote else Path(chosen[0])
    meta = _read_meta(path)
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
        if remote:
            fs, p = url_filesystem(str(path))
            dcp.load(state, storage_reader=dcp_reader(fs, p), no_dist=not is_distributed())
        else:
            dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
    if osd is not None:
        set_state_dict(model, _optimizers(optimizer), model_state_dict=_uncanon_model(state["model"], mback),
                       optim_state_dict=_uncanon_optim(state["optim"], oback))
    else:
        set_model_state_dict(model, _uncanon_model(state["model"], mback))

    if extra is not None:
        if "extra" in state:
            extra["state"] = state["extra"]
        extra["meta"] = meta.get("meta", {})
        rank_state = None
        if int(meta.get("world_size", -1)) == world:
            rank_state = _read_rank_file(path, rank)
        if rank_state is not None:
            extra["rank"] = rank_state
        else:
            if int(meta.get("world_size", -1)) != world:
                log.warning("checkpoint %s was written by %s ranks, this run has %s: per-rank state "
                            "(RNG, PowerSGD buffers) starts fresh", path, meta.get("world_size"), world)
            extra["rank"] = None
    return int(meta["step"])


def _read_rank_file(path: Path | str, rank: int) -> Any:
    name = f"rank-{rank:05d}.pt"
    if isinstance(path, Path):
        if not (path / name).is_file():
            return None
        return torch.load(path / name, map_location="cpu", weights_only=True)
    fs, p = url_filesystem(path)
    if not fs.exists(join(p, name)):
        return None
    return torch.load(io.BytesIO(fs.cat_file(join(p, name))), map_location="cpu", weights_only=True)


__all__ = ["FORMAT", "canonical_key", "checkpoint_location", "latest_step", "list_checkpoints", "load_latest", "read_latest_meta",
           "save_checkpoint", "step_dirname"]
