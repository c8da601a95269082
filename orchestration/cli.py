"""The `dalle` command line.

User errors (unknown profile, missing file, bad URL list) print one line naming
the cause and exit with status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dalle_core.heap import keep_freed_heap
from dalle_core.profiles import UnknownProfileError, get_profile, profile_names
from orchestration.human_eval.cli import add_human_eval_parser


class UserError(Exception):
    pass


USER_ERRORS = (UserError, UnknownProfileError, FileNotFoundError, ValueError)


def _settings(args):
    from orchestration.settings import Settings

    overrides = {}
    if getattr(args, "run_dir", None):
        overrides["run_dir"] = Path(args.run_dir)
    if getattr(args, "profile", None):
        overrides["profile"] = args.profile
    return Settings.from_env(**overrides)


def cmd_demo(args) -> int:
    from orchestration.demo import run_demo

    run_demo(_settings(args))
    return 0


def cmd_ui(args) -> int:
    """Dagster UI (dagster dev: webserver + daemon) and the MLflow UI, on 127.0.0.1."""
    from orchestration.demo import prepare_instance

    settings = _settings(args)
    prepare_instance(settings)
    env = {**os.environ, **settings.export()}
    bindir = Path(sys.executable).parent
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            [str(bindir / "dagster"), "dev", "-w", str(root / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(args.dagster_port)],
            env=env, cwd=root,
        ),
        subprocess.Popen(
            [str(bindir / "mlflow"), "ui", "--backend-store-uri", settings.mlflow_tracking_uri,
             "--default-artifact-root", Path(settings.mlflow_artifact_root).resolve().as_uri(),
             "--host", "127.0.0.1", "--port", str(args.mlflow_port)],
            env=env, cwd=root,
        ),
    ]
    print(f"Dagster UI: http://127.0.0.1:{args.dagster_port}   (instance {settings.dagster_home})")
    print(f"MLflow UI:  http://127.0.0.1:{args.mlflow_port}   (tracking {settings.mlflow_tracking_uri})")
    print("Ctrl-C stops both.")

    def stop(signum, frame):  # `kill`/`timeout` stop the children too, not just us
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


def cmd_demo_world_serve(args) -> int:
    from assets.resources import demo_world_for
    from dalle_core.demo.server import serve_demo_world

    world = demo_world_for(get_profile(args.profile))
    base = f"http://{args.host}:{args.port}"
    out = Path(args.out)
    lists = world.write_url_lists(out / "url_lists", base)
    eval_json = world.write_eval_set(out / "coco_eval")
    with serve_demo_world(world, host=args.host, port=args.port) as server:
        print(f"demo world ({args.profile}) serving at {server.url}")
        for p in lists:
            print(f"  URL list: {p}")
        print(f"  evaluation set (MS-COCO captions format): {eval_json}")
        print("Ctrl-C stops it.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_crawl(args) -> int:
    from dalle_core.data.crawl import crawl
    from dalle_core.storage import open_storage

    profile = get_profile(args.profile)
    url_list = Path(args.url_list)
    if not url_list.is_file():
        raise UserError(f"URL list not found: {url_list}")
    prefix = args.prefix or f"raw_pairs/{url_list.name.split('.')[0]}"
    storage = open_storage(args.storage, endpoint_url=args.endpoint_url)

    def progress(p):
        print(f"\r{p}", end="", file=sys.stderr, flush=True)

    result = crawl(url_list, storage, prefix, profile.data, progress=progress)
    print(file=sys.stderr)
    print(f"crawled {result.n_rows} rows: {result.n_ok} ok, {result.n_failed} failed "
          f"({result.pairs_per_s:.1f} pairs/s) -> {storage.uri(prefix)}")
    for reason, n in sorted(result.failures_by_reason.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:20s} {n}")
    return 0


def _load_dvae_cli(args):
    from assets.resources import MlflowResource
    from dalle_core.dvae.model import load_dvae

    return load_dvae(MlflowResource.from_settings(_settings(args)).resolve_weights(args.model, "dvae"))


def _read_image(path: Path, size: int, resize: bool):
    from PIL import Image, UnidentifiedImageError

    from dalle_core.data.image_decode import resize_center_crop
    from dalle_core.data.loader import image_to_tensor

    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    if resize:
        image = resize_center_crop(image.convert("RGB"), size)
    try:
        return image_to_tensor(image, size, name=str(path))
    except ValueError as e:
        raise UserError(f"{e} (use --resize to convert it)") from None


def _save_image(tensor, out: Path) -> None:
    from dalle_core.dvae.evaluate import tensor_to_image

    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_image(tensor).save(out)


def cmd_dvae_encode(args) -> int:
    import json

    import numpy as np

    from dalle_core.dvae.model import decode_codes, encode_to_codes

    encoder, decoder, cfg = _load_dvae_cli(args)
    x = _read_image(Path(args.image), cfg.image_size, args.resize)
    codes = encode_to_codes(encoder, x[None])[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, codes.numpy().astype(np.int16))
    else:
        out.write_text(json.dumps({"grid": cfg.grid_size, "vocab": cfg.vocab_size, "codes": codes.tolist()}))
    used = len(set(codes.flatten().tolist()))
    print(f"{args.image} -> {out}: {cfg.grid_size}x{cfg.grid_size} codes, {used} distinct of {cfg.vocab_size}")
    if args.reconstruction:
        _save_image(decode_codes(decoder, codes[None])[0], Path(args.reconstruction))
        print(f"reconstruction: {args.reconstruction}")
    return 0


def cmd_dvae_decode(args) -> int:
    import json

    import numpy as np
    import torch

    from dalle_core.dvae.model import decode_codes

    _, decoder, cfg = _load_dvae_cli(args)
    src = Path(args.codes)
    if not src.is_file():
        raise UserError(f"codes file not found: {src}")
    try:
        grid = np.load(src) if src.suffix == ".npy" else np.asarray(json.loads(src.read_text())["codes"])
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{src}: not a codes file written by 'dalle dvae encode' ({e})") from None
    if grid.shape != (cfg.grid_size, cfg.grid_size):
        raise UserError(f"{src}: expected a {cfg.grid_size}x{cfg.grid_size} grid for this dVAE, got {tuple(grid.shape)}")
    image = decode_codes(decoder, torch.as_tensor(grid, dtype=torch.long)[None])[0]
    _save_image(image, Path(args.out))
    print(f"{src} -> {args.out} ({cfg.image_size}x{cfg.image_size})")
    return 0


def _generation_chain(args):
    """The models of `dalle generate`, resolved by path or MLflow alias, checked to fit together."""
    from assets.resources import MlflowResource
    from dalle_core.dvae.model import load_dvae
    from dalle_core.generation import TextToImage
    from dalle_core.prior.model import load_prior
    from dalle_core.rerank import load_reranker
    from dalle_core.text.bpe import DalleTokenizer

    settings = _settings(args)
    mlflow = MlflowResource.from_settings(settings)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    prior = load_prior(mlflow.resolve_weights(args.prior, "prior"), device=device)
    encoder, decoder, _ = load_dvae(mlflow.resolve_weights(args.dvae, "dvae"), device=device)
    reranker = (None if args.reranker == "none"
                else load_reranker(mlflow.resolve_weights(args.reranker, "reranker"), device=device))
    tok_path = Path(args.tokenizer) if args.tokenizer else mlflow.resolve_companion(args.prior, "prior", ".json")
    if tok_path is None:  # a prior given by path: the tokenizer of the run's storage
        tok_path = Path(settings.storage_root) / "tokenizer" / "bpe.json"
    if not tok_path.is_file():
        raise UserError(f"tokenizer not found: {tok_path} (give --tokenizer PATH)")
    return TextToImage(prior, decoder, DalleTokenizer.load(tok_path), reranker=reranker, encoder=encoder), device


def cmd_generate(args) -> int:
    import contextlib

    import torch
    from tqdm import tqdm

    from dalle_core.dvae.evaluate import tensor_to_image
    from dalle_core.imaging import image_grid

    if not args.caption.strip():
        raise UserError("the caption is empty")
    if args.n < 1 or not 1 <= args.keep <= args.n:
        raise UserError(f"need --n >= 1 and 1 <= --keep <= --n, got --n {args.n} --keep {args.keep}")
    chain, device = _generation_chain(args)
    chain.tokenize([args.caption])  # a caption error before any sampling
    prompt = None
    if args.image_prompt:
        size = chain.grid * 2 ** (chain.encoder.group_count - 1)
        image = _read_image(Path(args.image_prompt), size, resize=True)
        rows = args.prompt_rows if args.prompt_rows is not None else chain.grid // 2
        prompt = chain.image_prompt(image[None].to(device), rows)
    bar = tqdm(total=None, desc="sampling image tokens", unit="tok", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else contextlib.nullcontext())
    t0 = time.time()
    with autocast:
        out = chain.generate([args.caption], n=args.n, keep=args.keep, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, prompt_codes=prompt,
                             batch_size=args.batch_size, use_cache=not args.no_cache, progress=progress,
                             guidance_scale=args.guidance_scale)
    bar.close()
    images = [tensor_to_image(x) for x in out.images[0]]
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, ncols=min(8, len(images)), cell=max(64, images[0].size[0])).save(dest)
    for i, im in enumerate(images):
        im.save(dest.with_name(f"{dest.stem}_{i + 1:02d}{dest.suffix or '.png'}"))
    how = "reranked by the contrastive model" if out.reranked else "in draw order (no reranker)"
    print(f"{args.n} samples in {time.time() - t0:.1f} s on {device}; kept {args.keep}, {how}")
    if out.scores is not None:
        print("scores: " + " ".join(f"{float(v):.3f}" for v in out.scores[0]))
    print(f"grid: {dest}; images: {dest.with_name(dest.stem + '_01' + (dest.suffix or '.png'))} ...")
    return 0


def cmd_plan(args) -> int:
    from dalle_core.distributed.plan import plan
    from dalle_core.stage_plan import plan_stages

    profile = get_profile(args.profile)
    if args.gpus_per_node < 1 or (args.nodes is not None and args.nodes < 1) or \
            (args.batch_per_gpu is not None and args.batch_per_gpu < 1) or (args.gpus is not None and args.gpus < 1):
        raise UserError("--gpus, --nodes, --gpus-per-node and --batch-per-gpu must be at least 1")
    if args.gpus is not None:
        if args.gpus % args.gpus_per_node:
            raise UserError(f"--gpus {args.gpus} is not a multiple of --gpus-per-node {args.gpus_per_node}")
        if args.nodes is not None and args.nodes * args.gpus_per_node != args.gpus:
            raise UserError(f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node} != --gpus {args.gpus}")
        nodes = args.gpus // args.gpus_per_node
    else:
        nodes = args.nodes or 1
    cfg = profile.prior
    batch_per_gpu = args.batch_per_gpu or (max(1, profile.prior_training.batch_size // args.gpus)
                                           if args.gpus is not None else 8)
    p = plan(cfg, nodes, args.gpus_per_node, batch_per_gpu,
             powersgd_rank=args.powersgd_rank, activation_checkpointing=not args.no_activation_checkpointing)
    sampling = sampling_plan(cfg, p.n_params, args.gpu_memory_gib)
    mfu = args.mfu
    try:
        stages = plan_stages(
            profile, nodes * args.gpus_per_node, args.gpu, gpus_per_node=args.gpus_per_node,
            batch_per_gpu=batch_per_gpu, powersgd_rank=args.powersgd_rank,
            activation_checkpointing=not args.no_activation_checkpointing, pairs=args.pairs,
            prior_mfu=args.prior_mfu or mfu, dvae_mfu=args.dvae_mfu or mfu, encode_mfu=args.dvae_mfu or mfu,
            sampling_mfu=mfu, dvae_gpus=args.dvae_gpus, network_bytes_per_s_per_gpu=args.network_gbs * 1e9,
            eval_captions=args.eval_captions, candidates=args.candidates, fetch_success=args.fetch_success,
            filter_keep=args.filter_keep, crawl_cpu_ms_per_pair=args.crawl_ms_per_pair,
            filter_cpu_ms_per_pair=args.filter_ms_per_pair, pods=args.pods, cores_per_pod=args.cores_per_pod,
            jpeg_bytes=args.jpeg_bytes)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        import json

        print(json.dumps({**p.to_dict(), "sampling": sampling, "stages": stages.to_dict()}, indent=1, default=str))
    else:
        print(p.to_table())
        print(f"sampling (bf16, one {args.gpu_memory_gib:g} GiB GPU, 10% reserve): KV cache "
              f"{sampling['kv_cache_bytes_per_row'] / 2**30:.3f} GiB/row, {sampling['bytes_per_row'] / 2**30:.3f} GiB/row "
              f"in all, weights {sampling['weights_bytes'] / 2**30:.1f} GiB -> batch {sampling['batch_size']} rows "
              f"(peak {sampling['peak_bytes'] / 2**30:.1f} GiB)")
        print(f"\nevery stage, {profile.name} on {nodes * args.gpus_per_node:,} x {args.gpu} "
              f"(dalle_core/stage_plan.py: rates and assumptions):")
        print(stages.to_table())
    return 0


def sampling_plan(cfg, n_params: int, gpu_memory_gib: float) -> dict:
    """The sampler's batch on one GPU (dalle_core.prior.sampling_memory), for `dalle plan`."""
    import torch

    from dalle_core.prior.sampling_memory import kv_cache_bytes_per_row, sampling_batch_size

    fit = sampling_batch_size(cfg, n_params, int(gpu_memory_gib * 2**30), torch.bfloat16)
    return {**fit.to_dict(), "kv_cache_bytes_per_row": kv_cache_bytes_per_row(cfg, torch.bfloat16)}


def _option(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in a pass-through argv (`--flag VALUE` or `--flag=VALUE`)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def cmd_resolve_profile(args) -> int:
    """Write the profile resolved against the image codes (the trainer's --profile-json)."""
    from dalle_core.profiles import read_code_manifest, write_resolved_profile

    manifest, source = read_code_manifest(args.codes)
    dest = write_resolved_profile(get_profile(args.profile), manifest, args.out, source)
    print(dest)
    return 0


def cmd_train_prior(args, rest: list[str]) -> int:
    """torchrun over `dalle_core.prior.train`; every other option goes to the training. The
    profile reaches the trainer the one way every launcher uses: resolved against the codes'
    manifest and written to OUT/profile.json (`write_resolved_profile`), as --profile-json."""
    from dalle_core.profiles import read_code_manifest, write_resolved_profile

    profile = get_profile(args.profile)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}"]
    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise UserError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    else:
        cmd.append("--standalone")
    if _option(rest, "--profile-json") is None:
        codes, out = _option(rest, "--codes"), _option(rest, "--out")
        if codes is None or out is None:
            raise UserError("train-prior needs --codes DIR and --out DIR (options of dalle_core.prior.train)")
        manifest, source = read_code_manifest(codes)
        rest = ["--profile-json", str(write_resolved_profile(profile, manifest, Path(out) / "profile.json", source)),
                *rest]
    cmd += ["-m", "dalle_core.prior.train", *rest]
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def cmd_lr(args) -> int:
    """Ask a running prior training to halve its learning rate now, or hold / release its detector."""
    from dalle_core.prior.lr_schedule import CONTROL_FILE, request_lr_action
    from dalle_core.storage import LocalStorage

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    req = request_lr_action(LocalStorage(run_dir), args.action, note=args.note)
    print(f"lr {req['action']} requested (#{req['seq']}) in {run_dir / CONTROL_FILE}; "
          "the trainer applies it at its next log interval (an lr_schedule event in its metrics)")
    return 0


def cmd_profiles(args) -> int:
    for name in profile_names():
        p = get_profile(name)
        print(f"{name:12s} image_size={p.data.image_size} shard_size={p.data.shard_size} "
              f"grid={p.dvae.grid_size}x{p.dvae.grid_size} image_vocab={p.dvae.vocab_size} "
              f"text={p.text.text_len}x{p.text.vocab_size} prior={p.prior.n_layer}x{p.prior.n_embd}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle", description="DALL-E platform command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole lineage on the built-in demo world")
    p.add_argument("--profile", default=None, help="tiny | small | medium (default: $DALLE_PROFILE or small)")
    p.add_argument("--run-dir", default=None, help="where everything goes (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI on 127.0.0.1")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--profile", default=None)
    p.add_argument("--dagster-port", type=int, default=3000)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("demo-world", help="the built-in synthetic web")
    dsub = p.add_subparsers(dest="demo_world_command", required=True)
    s = dsub.add_parser("serve", help="write its URL lists and eval set, and serve it over HTTP")
    s.add_argument("--profile", default="small")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--out", default="runs/demo-world")
    s.set_defaults(func=cmd_demo_world_serve)

    p = sub.add_parser("crawl", help="download a URL list (parquet/csv/tsv with url, caption) into shards")
    p.add_argument("url_list")
    p.add_argument("--storage", required=True, help="local directory or s3://bucket/prefix")
    p.add_argument("--prefix", default=None, help="key prefix inside storage (default raw_pairs/<list name>)")
    p.add_argument("--profile", default="small")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (MinIO, moto, ...)")
    p.set_defaults(func=cmd_crawl)

    p = sub.add_parser("dvae", help="look at what the dVAE does to an image")
    dsub = p.add_subparsers(dest="dvae_command", required=True)
    s = dsub.add_parser("encode", help="image -> token grid (argmax of the encoder logits)")
    s.add_argument("image")
    s.add_argument("--out", required=True, help="codes file (.json or .npy)")
    s.add_argument("--model", default="@champion", help="weights file, models:/dvae@alias, or @alias (default @champion)")
    s.add_argument("--reconstruction", default=None, help="also write the decoded image here (.png)")
    s.add_argument("--resize", action="store_true", help="resize + centre-crop instead of refusing other sizes")
    s.add_argument("--run-dir", default=None)
    s.set_defaults(func=cmd_dvae_encode)
    s = dsub.add_parser("decode", help="token grid -> image")
    s.add_argument("codes")
    s.add_argument("--out", required=True, help="image file (.png)")
    s.add_argument("--model", default="@champion")
    s.add_argument("--run-dir", default=None)
    s.set_defaults(func=cmd_dvae_decode)

    p = sub.add_parser("generate", help="images for a caption: sample the prior, decode, rerank")
    p.add_argument("caption")
    p.add_argument("--n", type=int, default=64, help="candidates to draw (the paper: 512)")
    p.add_argument("--keep", type=int, default=8, help="best candidates kept by the reranker")
    p.add_argument("--out", default="generated.png", help="the grid; each image goes next to it as NAME_01.png ...")
    p.add_argument("--image-prompt", default=None, help="an image whose top rows of codes are kept")
    p.add_argument("--prompt-rows", type=int, default=None, help="code rows kept from the image prompt (default half)")
    p.add_argument("--prior", default="@champion",
                   help="weights file, models:/prior@alias, @alias or a version number (default @champion: "
                        "the promoted prior, never an unpromoted challenger)")
    p.add_argument("--dvae", default="@champion")
    p.add_argument("--reranker", default="@champion", help="... or 'none' to keep the first draws")
    p.add_argument("--tokenizer", default=None, help="default: the one registered with the prior")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance (1: none, the paper's; > 1 needs a prior trained with "
                        "caption dropout, e.g. the small profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="rows decoded together (default all)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--run-dir", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="every stage at scale: data, encode, dVAE, the prior's memory per GPU, "
                                    "communication and time, sampling")
    p.add_argument("--profile", default="paper-12B")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in all (machines = GPUs / --gpus-per-node)")
    p.add_argument("--nodes", type=int, default=None, help="machines (default 1, or from --gpus)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--batch-per-gpu", type=int, default=None,
                   help="prior batch per GPU (default: the profile's batch / --gpus, else 8)")
    p.add_argument("--powersgd-rank", type=int, default=None, help="per-GPU rank (the paper: 112 at 12B)")
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="for the sampling batch (default: an 80 GiB H100)")
    from dalle_core import stage_plan as sp

    p.add_argument("--gpu", default="H100", choices=sorted(sp.GPUS), help="datasheet figures for the stage times")
    p.add_argument("--mfu", type=float, default=sp.DEFAULT_MFU, help="assumed model FLOPs utilisation")
    p.add_argument("--prior-mfu", type=float, default=None, help="for the prior (default --mfu)")
    p.add_argument("--dvae-mfu", type=float, default=None, help="for dVAE training and encoding (default --mfu)")
    p.add_argument("--pairs", type=int, default=sp.PAPER_PAIRS, help="pairs kept after the filters")
    p.add_argument("--fetch-success", type=float, default=sp.FETCH_SUCCESS, help="assumed share of URLs that download")
    p.add_argument("--filter-keep", type=float, default=sp.FILTER_KEEP, help="assumed share the filters keep")
    p.add_argument("--crawl-ms-per-pair", type=float, default=sp.CRAWL_CPU_MS_PER_PAIR,
                   help="crawler CPU per pair (measured: docs/benchmarks.md)")
    p.add_argument("--filter-ms-per-pair", type=float, default=sp.FILTER_CPU_MS_PER_PAIR,
                   help="filter CPU per pair (measured: bench/filters.py)")
    p.add_argument("--pods", type=int, default=16, help="crawl / filter pods")
    p.add_argument("--cores-per-pod", type=int, default=sp.CORES_PER_POD)
    p.add_argument("--jpeg-bytes", type=int, default=sp.JPEG_BYTES, help="assumed mean stored image")
    p.add_argument("--dvae-gpus", type=int, default=sp.PAPER_DVAE_GPUS)
    p.add_argument("--network-gbs", type=float, default=sp.NETWORK_BYTES_PER_S_PER_GPU / 1e9,
                   help="GB/s per GPU across machines")
    p.add_argument("--eval-captions", type=int, default=sp.PAPER_EVAL_CAPTIONS)
    p.add_argument("--candidates", type=int, default=sp.PAPER_CANDIDATES, help="samples per caption (reranked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train-prior", help="train the prior with torchrun (other options go to dalle_core.prior.train)")
    p.add_argument("--profile", default="small")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per machine")
    p.add_argument("--nnodes", type=int, default=1, help="machines")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="dalle-prior")
    p.set_defaults(func=cmd_train_prior, passthrough=True)

    p = sub.add_parser("resolve-profile", help="write a profile resolved against the image codes "
                       "(the prior trainer's --profile-json; used by the SLURM script and the k8s Job)")
    p.add_argument("--profile", required=True)
    p.add_argument("--codes", required=True, help="the image-code folder (its manifest.json), or a storage root")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.set_defaults(func=cmd_resolve_profile)

    p = sub.add_parser("lr", help="operator control of a running prior training's learning rate")
    p.add_argument("action", choices=("decay", "hold", "release"),
                   help="decay: halve now (counts toward the five); hold: no plateau decay until release")
    p.add_argument("--run-dir", required=True, help="the training's checkpoint directory (its --out)")
    p.add_argument("--note", default=None, help="why (kept with the decision in the run's events)")
    p.set_defaults(func=cmd_lr)

    p = sub.add_parser("profiles", help="list the run profiles")
    p.set_defaults(func=cmd_profiles)
    add_human_eval_parser(sub)
    from orchestration.compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C / SIGINT must stop us even when started in the background by a
    # non-interactive shell, which starts children with SIGINT ignored (and the
    # ignore would also pass on to `dagster dev` and the other servers we start).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args, rest = build_parser().parse_known_args(argv)
    keep_freed_heap()  # the in-process stages (reranker, sampling) reuse freed pages (dalle_core/heap.py)
    if rest and not getattr(args, "passthrough", False):
        build_parser().parse_args(argv)  # the usual error for unknown options
    try:
        return args.func(args, rest) if getattr(args, "passthrough", False) else args.func(args)
    except USER_ERRORS as e:
        print(f"dalle {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
