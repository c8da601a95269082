"""Stage one of the paper: the discrete VAE and the image codes it produces."""


import json
from typing import Dict

import dagster as dg
import torch

from assets.data import SHARDS, STORAGE_RETRY, load_eval_images, shards_asset
from assets.metadata import md, md_image, md_table
from assets.text import TOKENIZER_KEY, bpe_tokenizer
from dalle_core.data import codes as code_shards
from dalle_core.data.demo_world import check_image, parse_caption
from dalle_core.data.loader import image_batches, image_to_tensor, local_shard_paths
from dalle_core.data.shards import Manifest, ShardInfo, file_sha256, read_tar
from dalle_core.dvae.evaluate import evaluate_reconstructions
from dalle_core.dvae.model import encode_to_codes
from dalle_core.dvae.train import load_dvae, save_dvae, train_dvae
from dalle_core.imaging import image_grid, png_bytes
from dalle_core.text.bpe import DalleTokenizer
from orchestration.model_registry import CHALLENGER, DVAEModel, log_and_register, promote_if_better, resolve_weights
from orchestration.resources import MlflowResource, ProfileResource, StorageResource, data_version

DVAE_KEY = "dvae/dvae.pt"
CODES = "image_codes"


def config_digest(config: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_check(image, caption: str) -> bool:
    return check_image(image, caption).match


class DVAERunConfig(dg.Config):
    # champion / challenger: the new dVAE replaces the champion only if it beats it on all of these
    promote_on: Dict[str, str] = {"recon_mse": "lower"}


@dg.asset(
    deps=[shards_asset],
    group_name="dvae",
    kinds={"pytorch"},
    description="Discrete VAE (the released dall_e layout) trained with the ELB, gumbel-softmax "
    "relaxation (temperature 1 -> 1/16) and KL weight ramp; registered in MLflow as `dvae`.",
)
def dvae(
    context: dg.AssetExecutionContext, config: DVAERunConfig, storage: StorageResource, profile: ProfileResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    cfg = prof.dvae
    paths = local_shard_paths(store, SHARDS, cache_dir=storage.scratch("shard-cache"))
    # one checkpoint folder per config: a rerun resumes, a changed config starts afresh
    checkpoints = storage.scratch(f"dvae-checkpoints/{config_digest(cfg.to_dict())}")

    def batches(start_step: int):
        return image_batches(paths, cfg.batch_size, cfg.image_size, seed=cfg.seed, start_step=start_step)

    with mlflow.start_run("dvae", tags={"stage": "dvae", "profile": prof.name}, data_version=data_version(store)) as run:
        import mlflow as mlf

        mlf.log_params({k: v for k, v in cfg.to_dict().items() if not isinstance(v, (list, dict))})

        def on_log(step: int, metrics: dict) -> None:
            mlf.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            if step % (cfg.log_every * 4) == 0 or step == cfg.total_steps:
                context.log.info(f"dvae step {step}/{cfg.total_steps}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

        result = train_dvae(cfg, batches, checkpoints, on_log=on_log, device=training_device())
        encoder, decoder = result.encoder.cpu(), result.decoder.cpu()

        eval_set = load_eval_images(store, cfg.image_size, storage.scratch("eval-cache"))
        images = [im for im, _ in eval_set]
        captions = [c for _, c in eval_set]
        demo = all(parse_caption(c) is not None for c in captions)
        report = evaluate_reconstructions(encoder, decoder, images, captions, demo_check if demo else None)
        mlf.log_metrics(report.metrics(), step=cfg.total_steps)
        grid = image_grid([im for pair in zip(report.originals, report.reconstructions) for im in pair], ncols=8)
        mlf.log_image(grid, "reconstructions.png")

        model_file = save_dvae(storage.scratch("dvae") / "dvae.pt", encoder, decoder, cfg)
        store.put_file(DVAE_KEY, model_file)
        version = log_and_register(model_file, "dvae", DVAEModel(), alias=CHALLENGER)
        promoted, promotion = promote_if_better("dvae", version, report.metrics(), dict(config.promote_on))
        context.log.info(promotion)
        run_url = mlflow.run_url(run)

    final = result.final_metrics
    figures = {**{k: final[k] for k in ("recon", "kl", "total", "temperature", "beta", "usage", "perplexity") if k in final},
               **report.metrics()}
    context.log.info(f"dvae: {json.dumps({k: round(float(v), 4) for k, v in figures.items()})}")
    meta = {
        "steps": result.step,
        "resumed_from": result.resumed_from if result.resumed_from is not None else "none",
        "figures": md(md_table(["metric", "value"], [(k, f"{float(v):.4g}") for k, v in figures.items()])),
        "reconstructions": md(md_image(png_bytes(grid), "originals and reconstructions, side by side")),
        "model_version": f"dvae v{version} @{'champion' if promoted else CHALLENGER}",
        "promotion": promotion,
        "location": dg.MetadataValue.path(store.uri(DVAE_KEY)),
        "mlflow_run": dg.MetadataValue.url(run_url),
    }
    for k in ("caption_match_reconstruction", "caption_match_original", "eval_codebook_usage", "recon_mse"):
        if k in figures:
            meta[k] = round(float(figures[k]), 4)
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    retry_policy=STORAGE_RETRY,
    deps=[dvae, bpe_tokenizer],
    group_name="dvae",
    kinds={"pytorch"},
    description="Every shard's images as dVAE token grids (argmax of the encoder logits) next to "
    "the tokenized caption: what the prior trains on. Resumable shard by shard.",
)
def image_codes(
    context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    model_file = champion_dvae_file(mlflow)
    encoder, _, cfg = load_dvae(model_file, device=training_device())
    tokenizer = DalleTokenizer.from_json(store.get_text(TOKENIZER_KEY), source=store.uri(TOKENIZER_KEY))
    model_sha = file_sha256(model_file)
    manifest = Manifest.load(store, SHARDS)
    infos, skipped = [], 0
    for i, shard in enumerate(manifest.shards):
        out_key = f"{CODES}/{shard.name}"
        done_key = f"{CODES}/{shard.name}.done.json"
        if store.exists(done_key):  # resume: this shard was encoded with this very model
            done = json.loads(store.get_text(done_key))
            if done.get("dvae_sha256") == model_sha and done.get("source_sha256") == shard.sha256:
                infos.append(ShardInfo(**done["info"]))
                skipped += 1
                continue
        pairs = list(read_tar(store, f"{SHARDS}/{shard.name}"))
        coded = []
        for start in range(0, len(pairs), 256):
            chunk = pairs[start : start + 256]
            x = torch.stack([image_to_tensor(p.image, cfg.image_size, name=f"{shard.name}:{p.key}") for p in chunk])
            grid = encode_to_codes(encoder, x).cpu().numpy()
            text = tokenizer.encode_batch([p.caption for p in chunk]).numpy()
            for p, g, t in zip(chunk, grid, text):
                coded.append(code_shards.CodedPair(p.key, p.caption, t, g, {"url": p.meta.get("url"), "source_shard": shard.name}))
        info = write_code_shard_and_mark(store, out_key, done_key, coded, model_sha, shard.sha256)
        infos.append(info)
        context.log.info(f"image_codes: shard {i + 1}/{len(manifest.shards)} ({info.count} pairs)")
    extra = {"dvae_sha256": model_sha, "grid": cfg.grid_size, "image_vocab": cfg.vocab_size,
             "text_len": tokenizer.text_len, "text_vocab": tokenizer.total_vocab_size}
    out = code_shards.save_code_manifest(store, CODES, infos, extra)
    return dg.MaterializeResult(
        metadata={
            "samples": out.total,
            "shards": len(infos),
            "resumed_shards": skipped,
            "grid": f"{cfg.grid_size}x{cfg.grid_size} codes of {cfg.vocab_size}",
            "text": f"{tokenizer.text_len} tokens of {tokenizer.total_vocab_size} (incl. per-position pads)",
            "location": dg.MetadataValue.path(store.uri(CODES)),
        }
    )


def champion_dvae_file(mlflow: MlflowResource):
    """The dVAE every downstream asset uses: `dvae@champion` in the MLflow registry."""
    import mlflow as mlf

    mlf.set_tracking_uri(mlflow.tracking_uri)
    return resolve_weights("@champion", "dvae")


def write_code_shard_and_mark(store, out_key, done_key, coded, model_sha, source_sha):
    info = code_shards.write_code_shard(coded, store, out_key)
    store.put_text(done_key, json.dumps({"info": info.__dict__, "dvae_sha256": model_sha, "source_sha256": source_sha}))
    return info
