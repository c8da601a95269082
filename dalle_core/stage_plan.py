"""Every stage at paper scale, planned before anything is launched: from the
paper's 250M pairs to the prior on 1,024 GPUs (`dalle plan`).

Nothing here runs a model on data. Shapes come from the profile's models built
on the meta device (FLOPs counted there by `torch.utils.flop_counter`, saved
activations by autograd's saved-tensor hooks); every rate is a named constant
or an argument, with where it comes from:

    measured here (docs/benchmarks.md)
      CRAWL_CPU_MS_PER_PAIR   4.0   our crawler's CPU per pair ("Crawl": download,
                                    decode, resize, encode, write; 64-px PNGs)
      FILTER_CPU_MS_PER_PAIR  1.13  the paper's filter pipeline per downloaded pair
                                    (bench/filters.py, 256x256 JPEG q95, one core)
      DECODE_CPU_MS_PER_PAIR  0.47  JPEG decode of a 256x256 image (same run), the
                                    data loader's CPU per image when encoding codes
    datasheet (dense 16-bit tensor-core peak, memory, HBM bandwidth): `GPUS`
    assumed (arguments; replace with the GPU check's figures, bench/gpu_check.sh)
      MFU 0.30 for the prior, the dVAE and the encoder (torchtitan publishes
      33-39% for Llama 3.1 8B on 8 H100s, DESIGN.md); URL fetch success 0.7
      (web lists lose 20-50% to dead links: DataConfig); filters keep 0.8;
      mean stored JPEG 38 KB (bench/filters.py's noisy 256x256 q95 images);
      caption 60 bytes, metadata 300 bytes; network 50 GB/s per GPU across
      machines (one 400 Gb/s NIC per GPU).

Stages and formulas (P parameters; G GPUs; F peak FLOP/s; u MFU):
    data      downloaded = pairs / filter_keep; URLs = downloaded / fetch_success;
              crawl CPU = downloaded * CRAWL ms; filter CPU =
              downloaded * FILTER ms; pod-hours = CPU hours / cores per pod; wall
              hours = CPU hours / (pods * cores per pod). Shards = ceil(pairs /
              shard_size). Bytes: each WebDataset member is a 512-byte tar header
              + its data padded to 512 (no PAX header: our writers' mtime is an
              int, `TAR_MTIME`): image shards (jpg, txt, json), the crawl's
              raw parts the same for every downloaded pair, code shards
              (codes.npy int16 grid^2, text.npy int32 text_len, txt, json).
    encode    pairs * encoder FLOPs / (G * F * u); loader CPU = pairs * DECODE ms
    dvae      step FLOPs = batch * (forward + backward FLOPs of one image, counted);
              step time = step FLOPs / (G_dvae * F * u); memory per GPU = P_dvae *
              (4 + 4 + 8 + 4: fp32 weights, grads, Adam, EMA) + saved activations
              of one image * batch / G_dvae (fp32, counted; bf16 autocast saves
              the conv inputs in 16 bits, so this is an upper bound)
    prior     FLOPs per token = 6 * (layer parameters) + 12 * layers * seq * d (the
              formula bench/prior.py reports MFU with); time = updates * batch * seq
              * FLOPs per token / (G * F * u); per update also the communication
              time from `distributed.plan` bytes (all-gather + reduce-scatter over
              NVLink, PowerSGD across machines over the network), not overlapped:
              a bound to compare with the compute time
    sampling  batch per GPU from `prior.sampling_memory` (KV cache per row and
              free memory); each of the N image steps reads the bf16 weights and
              the batch's KV caches (mean length L + N/2) and does batch * 2 P'
              FLOPs (P' = FLOPs per token / 3, forward); step time = max(memory
              / HBM bandwidth, FLOPs / (F * u)); images per GPU-second = batch /
              (N * step time); the zero-shot evaluation samples captions x
              candidates (the paper: 30,000 x 512, CLIP reranking not counted)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3

# --- measured rates (docs/benchmarks.md) ------------------------------------------------------------
CRAWL_CPU_MS_PER_PAIR = 4.0  # "Crawl: ours vs img2dataset": about 4 ms of CPU per pair
FILTER_CPU_MS_PER_PAIR = 1.13  # "Filters" (bench/filters.py): paper filters, 256x256 JPEG, one core
DECODE_CPU_MS_PER_PAIR = 0.47  # same run: decoding the stored JPEG alone

# --- the paper -------------------------------------------------------------------------------------------
PAPER_PAIRS = 250_000_000
PAPER_DVAE_GPUS = 64  # batch 512 = 8 per GPU (appendix A.2)
PAPER_PRIOR_GPUS = 1024  # batch 1024 (section 2.5: 1 per GPU)
PAPER_EVAL_CAPTIONS = 30_000
PAPER_CANDIDATES = 512

# --- assumptions (arguments everywhere) ---------------------------------------------------------------------
DEFAULT_MFU = 0.30
FETCH_SUCCESS = 0.7
FILTER_KEEP = 0.8
JPEG_BYTES = 38_000
CAPTION_BYTES = 60
META_BYTES = 300
CORES_PER_POD = 16
NETWORK_BYTES_PER_S_PER_GPU = 50e9


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s, without sparsity
    memory_bytes: int
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# datasheets (SXM parts)
GPUS = {
    "H100": GPUSpec("H100 SXM 80GB", 989e12, 80 * GIB, 3.35e12, 450e9),
    "H200": GPUSpec("H200 SXM 141GB", 989e12, 141 * 10**9, 4.8e12, 450e9),
    "A100": GPUSpec("A100 SXM 80GB", 312e12, 80 * GIB, 2.039e12, 300e9),
    "V100": GPUSpec("V100 SXM2 16GB (the paper's)", 125e12, 16 * GIB, 0.9e12, 150e9),
}


# A tar member with a float mtime (0.0, what our writers passed until 2026-12-01) gets a PAX
# extended header from Python's tarfile: one more 512-byte header and one 512-byte block
# holding "mtime=0.0". Our writers now pass an int (`dalle_core.data.shards.TAR_MTIME`); the
# figure stays so that shards written before can be sized (pax=True).
TAR_PAX_BYTES = 1024


def tar_member_bytes(size: int, pax: bool = False) -> int:
    """Bytes one file of `size` takes in a tar: a 512-byte header + the data padded to 512
    (+ `TAR_PAX_BYTES` with pax=True: a member written with a float mtime)."""
    return 512 + (TAR_PAX_BYTES if pax else 0) + -(-int(size) // 512) * 512


def npy_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of `numpy.save` of an array (header + data), computed by numpy itself."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": tuple(shape)})
    return len(buf.getvalue()) + math.prod(shape) * np.dtype(dtype).itemsize


def prior_flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 x layer parameters + 12 x layers x seq x d (dense
    attention, what SDPA computes under a mask); the formula bench/prior.py reports MFU with."""
    d = cfg.n_embd
    return 6 * cfg.n_layer * (12 * d * d + 13 * d) + 12 * cfg.n_layer * cfg.seq_len * d


# --- the dVAE on the meta device ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DVAECost:
    encoder_params: int
    decoder_params: int
    encode_flops: int  # one image, forward of the encoder
    decode_flops: int  # one image, forward of the decoder (from relaxed one-hot codes)
    train_flops: int  # one image, forward + backward of encoder, decoder and loss
    saved_bytes: int  # one image, tensors autograd saves for backward (fp32)


def dvae_cost(dvae_config) -> DVAECost:
    """Count the dVAE's FLOPs and saved activations for one image on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dalle_core.dvae.losses import elb_loss, gumbel_softmax_relaxation
    from dalle_core.dvae.model import build_dvae, map_pixels

    enc, dec = build_dvae(dvae_config, device="cpu", requires_grad=True, use_mixed_precision=False)
    enc, dec = enc.to("meta"), dec.to("meta")
    s = dvae_config.image_size
    x = torch.rand(1, dvae_config.input_channels, s, s, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc(map_pixels(x))
    encode = counter.get_total_flops()
    grid = dvae_config.grid_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dec(torch.rand(1, dvae_config.vocab_size, grid, grid, device="meta"))
    decode = counter.get_total_flops()
    saved: dict[int, tuple[Any, int]] = {}

    def pack(t):
        saved[id(t)] = (t, t.numel() * t.element_size())  # keep t alive: ids stay unique
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = enc(map_pixels(x))
        z = gumbel_softmax_relaxation(logits.float(), 1.0)
        out = dec(z)
        elb_loss(x, logits.float(), out.float(), kl_weight=6.6)["total"].backward()
    return DVAECost(sum(p.numel() for p in enc.parameters()), sum(p.numel() for p in dec.parameters()),
                    int(encode), int(decode), int(counter.get_total_flops()), sum(b for _, b in saved.values()))


# --- the plan ----------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    profile: str
    gpu: dict[str, Any]
    data: dict[str, Any]
    encode: dict[str, Any]
    dvae: dict[str, Any]
    prior: dict[str, Any]
    sampling: dict[str, Any]
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        def b(x: float) -> str:
            for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
                if x >= size:
                    return f"{x / size:,.2f} {unit}"
            return f"{x:,.0f} B"

        def t(s: float) -> str:
            if s >= 2 * 86400:
                return f"{s / 86400:,.1f} days"
            if s >= 2 * 3600:
                return f"{s / 3600:,.1f} h"
            if s >= 120:
                return f"{s / 60:,.1f} min"
            return f"{s:,.3g} s"

        d, e, v, p, s = self.data, self.encode, self.dvae, self.prior, self.sampling
        rows = [
            ("GPU", f"{self.gpu['name']}: {self.gpu['peak_flops'] / 1e12:,.0f} TFLOP/s dense 16-bit, "
                    f"{self.gpu['memory_bytes'] / GIB:,.0f} GiB, HBM {self.gpu['hbm_bytes_per_s'] / 1e12:.2f} TB/s"),
            ("data: pairs kept / downloaded / URLs", f"{d['pairs']:,} / {d['downloaded']:,} / {d['urls']:,} "
             f"(fetch {d['fetch_success']:.0%}, filters keep {d['filter_keep']:.0%})"),
            ("data: crawl CPU", f"{d['crawl_core_hours']:,.0f} core-h ({d['crawl_cpu_ms_per_pair']} ms/pair) = "
             f"{d['crawl_pod_hours']:,.0f} pod-h of {d['cores_per_pod']} cores; {t(d['crawl_wall_s'])} on "
             f"{d['pods']} pods"),
            ("data: filter CPU", f"{d['filter_core_hours']:,.0f} core-h ({d['filter_cpu_ms_per_pair']} ms/pair) = "
             f"{d['filter_pod_hours']:,.0f} pod-h; {t(d['filter_wall_s'])} on {d['pods']} pods"),
            ("data: shards", f"{d['shards']:,} of {d['shard_size']:,} pairs"),
            ("data: storage", f"raw crawl {b(d['raw_bytes'])} + image shards {b(d['shard_bytes'])} + codes "
             f"{b(d['code_bytes'])} = {b(d['total_bytes'])} ({d['shard_bytes_per_pair']:,} B/pair in shards, "
             f"{d['code_bytes_per_pair']:,} B/pair in codes)"),
            ("encode: dVAE encoder", f"{e['flops_per_image'] / 1e9:,.1f} GFLOP/image x {e['images']:,} = "
             f"{e['total_flops']:.3g} FLOP; {t(e['time_s'])} on {e['gpus']:,} GPUs at MFU {e['mfu']:.0%} "
             f"(loader {e['loader_core_hours']:,.0f} core-h)"),
            ("dVAE: parameters", f"{v['params']:,} (encoder {v['encoder_params']:,}, decoder {v['decoder_params']:,})"),
            ("dVAE: memory per GPU", f"{b(v['memory_per_gpu_bytes'])} (state {b(v['state_bytes'])} + activations "
             f"{b(v['activation_bytes_per_gpu'])} at {v['batch_per_gpu']}/GPU)"),
            ("dVAE: step", f"batch {v['batch']} on {v['gpus']} GPUs: {v['train_flops_per_image'] / 1e12:.2f} TFLOP/image, "
             f"{t(v['step_s'])}/step at MFU {v['mfu']:.0%}; {v['steps']:,} steps = {t(v['time_s'])}"),
            ("prior: FLOPs", f"{p['flops_per_token'] / 1e9:,.1f} GFLOP/token x {p['tokens']:.3g} tokens "
             f"({p['updates']:,} updates x {p['batch']:,} x {p['seq_len']}) = {p['total_flops']:.3g} FLOP"),
            ("prior: time", f"{t(p['compute_s_per_update'])}/update compute on {p['gpus']:,} GPUs at MFU "
             f"{p['mfu']:.0%} -> {t(p['time_s'])}"),
            ("prior: comms/update (not overlapped)", f"in machine {t(p['intra_s_per_update'])}, across "
             f"{t(p['inter_s_per_update'])} ({b(p['inter_bytes_per_gpu'])}/GPU at "
             f"{p['network_bytes_per_s_per_gpu'] / 1e9:g} GB/s)"),
        ]
        if "error" in s:
            rows.append(("sampling", f"does not fit one GPU: {s['error']}"))
        else:
            rows += [
            ("sampling: batch per GPU", f"{s['batch']} rows (KV cache {b(s['kv_cache_bytes_per_row'])}/row, "
             f"weights {b(s['weights_bytes'])}, peak {b(s['peak_bytes'])})"),
            ("sampling: step", f"{t(s['step_s'])} ({s['bound']}-bound: reads {b(s['bytes_per_step'])}, "
             f"{s['flops_per_step'] / 1e12:.1f} TFLOP) -> {s['images_per_gpu_s']:.3g} images/s per GPU"),
            ("sampling: zero-shot eval", f"{s['eval_captions']:,} captions x {s['candidates']} = "
             f"{s['eval_images']:,} images: {t(s['eval_time_s'])} on {s['gpus']:,} GPUs"),
            ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def plan_data(data_config, text_len: int, image_grid: int, pairs: int = PAPER_PAIRS, *, pax: bool = False,
              fetch_success: float = FETCH_SUCCESS, filter_keep: float = FILTER_KEEP,
              crawl_cpu_ms_per_pair: float = CRAWL_CPU_MS_PER_PAIR,
              filter_cpu_ms_per_pair: float = FILTER_CPU_MS_PER_PAIR, pods: int = 16,
              cores_per_pod: int = CORES_PER_POD, jpeg_bytes: int = JPEG_BYTES,
              caption_bytes: int = CAPTION_BYTES, meta_bytes: int = META_BYTES) -> dict[str, Any]:
    """The data stage (module docstring)."""
    if not (0 < fetch_success <= 1 and 0 < filter_keep <= 1):
        raise ValueError("fetch_success and filter_keep must be in (0, 1]")
    if pairs < 1 or pods < 1 or cores_per_pod < 1:
        raise ValueError("pairs, pods and cores_per_pod must be >= 1")
    downloaded = math.ceil(pairs / filter_keep)
    urls = math.ceil(downloaded / fetch_success)
    crawl_h = downloaded * crawl_cpu_ms_per_pair / 3.6e6
    filter_h = downloaded * filter_cpu_ms_per_pair / 3.6e6
    cores = pods * cores_per_pod
    text_members = tar_member_bytes(caption_bytes, pax) + tar_member_bytes(meta_bytes, pax)
    shard_pair = tar_member_bytes(jpeg_bytes, pax) + text_members
    code_pair = (tar_member_bytes(npy_bytes((image_grid, image_grid), "<i2"), pax)
                 + tar_member_bytes(npy_bytes((text_len,), "<i4"), pax) + text_members)
    shards = math.ceil(pairs / data_config.shard_size)
    raw, shard_bytes = downloaded * shard_pair, pairs * shard_pair
    codes = pairs * code_pair
    return {
        "pairs": pairs, "fetch_success": fetch_success, "filter_keep": filter_keep, "urls": urls,
        "downloaded": downloaded, "crawl_cpu_ms_per_pair": crawl_cpu_ms_per_pair,
        "filter_cpu_ms_per_pair": filter_cpu_ms_per_pair, "crawl_core_hours": crawl_h,
        "filter_core_hours": filter_h, "cores_per_pod": cores_per_pod, "pods": pods,
        "crawl_pod_hours": crawl_h / cores_per_pod, "filter_pod_hours": filter_h / cores_per_pod,
        "crawl_wall_s": crawl_h * 3600 / cores, "filter_wall_s": filter_h * 3600 / cores,
        "shard_size": data_config.shard_size, "shards": shards, "image_format": data_config.image_format, "tar_pax_headers": pax,
        "image_size": data_config.image_size, "shard_bytes_per_pair": shard_pair, "code_bytes_per_pair": code_pair,
        "raw_bytes": raw, "shard_bytes": shard_bytes, "code_bytes": codes, "total_bytes": raw + shard_bytes + codes,
    }


def _sampling(cfg, fit, fpt: float, spec: GPUSpec, sampling_mfu: float, gpus: int, eval_captions: int,
              candidates: int) -> dict[str, Any]:
    """The sampling stage for a batch that fits (module docstring)."""
    import torch

    from dalle_core.prior.sampling_memory import kv_cache_bytes_per_row

    kv_row = kv_cache_bytes_per_row(cfg, torch.bfloat16)
    mean_len = cfg.text_len + cfg.image_len / 2
    kv_read = fit.batch_size * kv_row * mean_len / cfg.seq_len
    bytes_step = fit.weights_bytes + kv_read
    flops_step = fit.batch_size * fpt / 3
    mem_s, flop_s = bytes_step / spec.hbm_bytes_per_s, flops_step / (spec.peak_flops * sampling_mfu)
    step = max(mem_s, flop_s)
    rate = fit.batch_size / (cfg.image_len * step)
    eval_images = eval_captions * candidates
    return {"batch": fit.batch_size, "kv_cache_bytes_per_row": kv_row, "weights_bytes": fit.weights_bytes,
            "peak_bytes": fit.peak_bytes, "bytes_per_step": bytes_step, "flops_per_step": flops_step,
            "step_s": step, "bound": "memory" if mem_s >= flop_s else "compute", "mfu": sampling_mfu,
            "images_per_gpu_s": rate, "eval_captions": eval_captions, "candidates": candidates,
            "eval_images": eval_images, "gpus": gpus, "eval_time_s": eval_images / (rate * gpus)}


def plan_stages(profile, gpus: int = PAPER_PRIOR_GPUS, gpu: str = "H100", *, gpus_per_node: int = 8,
                batch_per_gpu: int | None = None, powersgd_rank: int | None = 112,
                activation_checkpointing: bool = True, pairs: int = PAPER_PAIRS, prior_mfu: float = DEFAULT_MFU,
                dvae_mfu: float = DEFAULT_MFU, encode_mfu: float = DEFAULT_MFU, sampling_mfu: float = DEFAULT_MFU,
                dvae_gpus: int = PAPER_DVAE_GPUS, encode_gpus: int | None = None,
                network_bytes_per_s_per_gpu: float = NETWORK_BYTES_PER_S_PER_GPU,
                eval_captions: int = PAPER_EVAL_CAPTIONS, candidates: int = PAPER_CANDIDATES,
                prior_updates: int | None = None, prior_batch: int | None = None,
                dvae_cost_: DVAECost | None = None, **data_kw: Any) -> StagePlan:
    """Every stage of `profile` (a dalle_core.profiles.Profile) at `gpus` GPUs of kind `gpu`."""
    from dalle_core.distributed.plan import plan as prior_plan
    from dalle_core.prior.sampling_memory import sampling_batch_size

    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; one of {sorted(GPUS)}")
    spec = GPUS[gpu]
    if gpus < 1 or gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not split into machines of {gpus_per_node}")
    for name, u in (("prior_mfu", prior_mfu), ("dvae_mfu", dvae_mfu), ("encode_mfu", encode_mfu),
                    ("sampling_mfu", sampling_mfu)):
        if not 0 < u <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {u}")
    cfg, training = profile.prior, profile.prior_training
    updates = int(prior_updates or training.total_steps)
    batch = int(prior_batch or training.batch_size)
    per_gpu = batch_per_gpu or max(1, batch // gpus)
    nodes = gpus // gpus_per_node

    # data
    data = plan_data(profile.data, cfg.text_len, cfg.image_grid, pairs, **data_kw)

    # dVAE: encode and train
    cost = dvae_cost_ or dvae_cost(profile.dvae)
    enc_gpus = encode_gpus or gpus
    encode_total = pairs * cost.encode_flops
    encode = {"flops_per_image": cost.encode_flops, "images": pairs, "total_flops": encode_total,
              "gpus": enc_gpus, "mfu": encode_mfu, "time_s": encode_total / (enc_gpus * spec.peak_flops * encode_mfu),
              "loader_core_hours": pairs * DECODE_CPU_MS_PER_PAIR / 3.6e6,
              "decode_cpu_ms_per_pair": DECODE_CPU_MS_PER_PAIR}
    dv = profile.dvae
    dvae_params = cost.encoder_params + cost.decoder_params
    dvae_batch_per_gpu = max(1, dv.batch_size // dvae_gpus)
    step_flops = dv.batch_size * cost.train_flops
    step_s = step_flops / (dvae_gpus * spec.peak_flops * dvae_mfu)
    state = dvae_params * (4 + 4 + 8 + 4)
    act = cost.saved_bytes * dvae_batch_per_gpu
    dvae = {"params": dvae_params, "encoder_params": cost.encoder_params, "decoder_params": cost.decoder_params,
            "batch": dv.batch_size, "gpus": dvae_gpus, "batch_per_gpu": dvae_batch_per_gpu,
            "train_flops_per_image": cost.train_flops, "step_flops": step_flops, "mfu": dvae_mfu, "step_s": step_s,
            "steps": dv.total_steps, "time_s": step_s * dv.total_steps, "state_bytes": state,
            "saved_bytes_per_image": cost.saved_bytes, "activation_bytes_per_gpu": act,
            "memory_per_gpu_bytes": state + act}

    # prior: memory and bytes per step (distributed.plan), time
    pp = prior_plan(cfg, nodes, gpus_per_node, per_gpu, powersgd_rank=powersgd_rank if nodes > 1 else None,
                    activation_checkpointing=activation_checkpointing)
    fpt = prior_flops_per_token(cfg)
    tokens = updates * batch * cfg.seq_len
    per_update = batch * cfg.seq_len * fpt / (gpus * spec.peak_flops * prior_mfu)
    intra_s = pp.intra_bytes / spec.nvlink_bytes_per_s if gpus_per_node > 1 else 0.0
    inter_s = pp.inter_bytes / network_bytes_per_s_per_gpu if nodes > 1 else 0.0
    prior = {"params": pp.n_params, "flops_per_token": fpt, "updates": updates, "batch": batch,
             "batch_per_gpu": per_gpu, "seq_len": cfg.seq_len, "tokens": tokens, "total_flops": tokens * fpt,
             "gpus": gpus, "nodes": nodes, "gpus_per_node": gpus_per_node, "mfu": prior_mfu,
             "compute_s_per_update": per_update, "time_s": per_update * updates,
             "intra_bytes_per_gpu": pp.intra_bytes, "inter_bytes_per_gpu": pp.inter_bytes,
             "intra_s_per_update": intra_s, "inter_s_per_update": inter_s,
             "network_bytes_per_s_per_gpu": network_bytes_per_s_per_gpu,
             "memory_per_gpu": pp.rank_memory.to_dict() if pp.rank_memory else None}

    # sampling
    import torch

    from dalle_core.prior.sampling_memory import SamplingMemoryError

    try:
        fit = sampling_batch_size(cfg, pp.n_params, spec.memory_bytes, torch.bfloat16)
        sampling = _sampling(cfg, fit, fpt, spec, sampling_mfu, gpus, eval_captions, candidates)
    except SamplingMemoryError as e:  # e.g. 12B in bf16 on a 16 GB V100: it must be sharded to sample
        sampling = {"error": str(e), "gpus": gpus}

    assumptions = {"fetch_success": data["fetch_success"], "filter_keep": data["filter_keep"],
                   "jpeg_bytes": data_kw.get("jpeg_bytes", JPEG_BYTES),
                   "caption_bytes": data_kw.get("caption_bytes", CAPTION_BYTES),
                   "meta_bytes": data_kw.get("meta_bytes", META_BYTES),
                   "mfu": {"prior": prior_mfu, "dvae": dvae_mfu, "encode": encode_mfu, "sampling": sampling_mfu},
                   "network_bytes_per_s_per_gpu": network_bytes_per_s_per_gpu,
                   "measured": {"crawl_cpu_ms_per_pair": data["crawl_cpu_ms_per_pair"],
                                "filter_cpu_ms_per_pair": data["filter_cpu_ms_per_pair"],
                                "decode_cpu_ms_per_pair": DECODE_CPU_MS_PER_PAIR,
                                "source": "docs/benchmarks.md"}}
    return StagePlan(profile=profile.name, gpu=spec.to_dict(), data=data, encode=encode, dvae=dvae, prior=prior,
                     sampling=sampling, assumptions=assumptions)


__all__ = ["CRAWL_CPU_MS_PER_PAIR", "DECODE_CPU_MS_PER_PAIR", "DVAECost", "FILTER_CPU_MS_PER_PAIR", "GPUS",
           "GPUSpec", "StagePlan", "TAR_PAX_BYTES", "dvae_cost", "npy_bytes", "plan_data", "plan_stages", "prior_flops_per_token",
           "tar_member_bytes"]
