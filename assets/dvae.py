"""Stage one of the paper: the discrete VAE and the image codes it produces."""


import hashlib
import json
import os
from typing import Dict

import dagster as dg
import torch

from assets.launchers import TorchrunLauncher
from assets.data import SHARDS, STORAGE_RETRY, code_shards, load_eval_images, require_passing_shards, shards_asset
from assets.metadata import md, md_image, md_table
from assets.model_registry import CHALLENGER, DVAEModel
from assets.resources import MlflowResource, ProfileResource, StorageResource, code_version, data_version
from assets.text import TOKENIZER_KEY, bpe_tokenizer, tokenizer_sha256
from dalle_core.data import codes
from dalle_core.data.loader import image_batches, image_to_tensor, local_shard_paths
from dalle_core.data.shards import Manifest, ShardInfo, file_sha256, read_tar
from dalle_core.demo.checker import check_image
from dalle_core.demo.scenes import parse_caption
from dalle_core.dvae.evaluate import evaluate_reconstructions
from dalle_core.dvae.model import encode_to_codes, load_dvae, save_dvae
from dalle_core.dvae.train import TrainResult, train_dvae
from dalle_core.eval.fairness import digest_texts, make_fingerprint
from dalle_core.eval.images import image_set_digest
from dalle_core.imaging import image_grid, png_bytes
from dalle_core.text.bpe import DalleTokenizer

DVAE_KEY = "dvae/dvae.pt"
CODES = "image_codes"


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_check(image, caption: str) -> bool:
    return check_image(image, caption).match


class DVAERunConfig(dg.Config):
    # champion / challenger: the new dVAE replaces the champion only if it beats it on all of these,
    # both measured on the same held-out images with the same code (the evaluation's fingerprint;
    # a champion without figures under it is re-scored in the same run)
    promote_on: Dict[str, str] = {"recon_mse": "lower"}
    # data-parallel processes (GPUs on a machine; gloo CPU processes here) x machines: above 1
    # (or on a cluster backend of the `torchrun` resource) the training runs under torchrun
    # (orchestration/dvae_entry.py) through Dagster Pipes, the profile's batch_size split over
    # the ranks (the paper: 64 GPUs, batch 512); 1 process trains here, as the demo does
    nproc_per_node: int = 1
    nodes: int = 1


@dg.asset(
    deps=[shards_asset],
    group_name="dvae",
    kinds={"pytorch"},
    description="Discrete VAE (the released dall_e layout) trained with the ELB, gumbel-softmax "
    "relaxation (temperature 1 -> 1/16) and KL weight ramp; registered in MLflow as `dvae`.",
)
def dvae(
    context: dg.AssetExecutionContext, config: DVAERunConfig, storage: StorageResource, profile: ProfileResource,
    mlflow: MlflowResource, torchrun: TorchrunLauncher,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    require_passing_shards(store)  # the dVAE (and so the weekly retrain) never trains on shards that failed their suite
    cfg = prof.dvae
    paths = local_shard_paths(store, SHARDS, cache_dir=storage.scratch("shard-cache"))
    # one checkpoint folder per config and data: a rerun on the same shards resumes (a finished run is
    # loaded back), a changed config or new shards (the retrain after new data landed) start afresh
    world = config.nodes * config.nproc_per_node
    distributed = world > 1 or torchrun.backend != "local"
    # (a data-parallel run draws its gumbel noise per image: its own folder, resumable at any world size)
    key = {**cfg.to_dict(), "shards": Manifest.load(store, SHARDS).content_digest()}
    checkpoints = storage.scratch(f"dvae-checkpoints/{config_digest(key)}" + ("-dp" if distributed else ""))

    def batches(start_step: int):
        return image_batches(paths, cfg.batch_size, cfg.image_size, seed=cfg.seed, start_step=start_step)

    with mlflow.start_run("dvae", tags={"stage": "dvae", "profile": prof.name}, data_version=data_version(store)) as run:
        mlflow.log_params({k: v for k, v in cfg.to_dict().items() if not isinstance(v, (list, dict))})

        def on_log(step: int, metrics: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            if step % (cfg.log_every * 4) == 0 or step == cfg.total_steps:
                context.log.info(f"dvae step {step}/{cfg.total_steps}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

        reported = None
        if distributed:
            result, reported = train_dvae_torchrun(context, torchrun, cfg, paths, checkpoints, config.nodes,
                                                   config.nproc_per_node, mlflow.tracking_uri, run.info.run_id)
        else:
            result = train_dvae(cfg, batches, checkpoints, on_log=on_log, device=training_device())
        encoder, decoder = result.encoder.cpu(), result.decoder.cpu()

        eval_set = load_eval_images(store, cfg.image_size, storage.scratch("eval-cache"))
        images = [im for im, _ in eval_set]
        captions = [c for _, c in eval_set]
        demo = all(parse_caption(c) is not None for c in captions)
        report = evaluate_reconstructions(encoder, decoder, images, captions, demo_check if demo else None)
        mlflow.log_metrics(report.metrics(), step=cfg.total_steps)
        grid = image_grid([im for pair in zip(report.originals, report.reconstructions) for im in pair], ncols=8)
        mlflow.log_image(grid, "reconstructions.png")

        model_file = save_dvae(storage.scratch("dvae") / "dvae.pt", encoder, decoder, cfg)
        store.put_file(DVAE_KEY, model_file)
        version = mlflow.log_and_register(model_file, "dvae", DVAEModel(), alias=CHALLENGER)
        figures_now = report.metrics()
        # what the figures depend on besides the model: the held-out images and captions, the checker, the code
        fingerprint = make_fingerprint(evaluation="dvae held-out reconstructions", images=image_set_digest(images),
                                       captions=digest_texts(captions), checker="demo world" if demo else "none",
                                       code_version=code_version())
        champ_figures, rescored = None, ""
        champ = mlflow.champion_to_rescore("dvae", version, fingerprint, dict(config.promote_on))
        if champ is not None:  # re-scored under the same conditions (cheap: one encode / decode of the held-out images)
            champ_figures, rescored = rescore_dvae(mlflow, champ, images, captions, demo, cfg.image_size)
            context.log.info(f"dvae: champion v{champ} {rescored}")
        promotion = mlflow.promote_if_better("dvae", version, figures_now, dict(config.promote_on), fingerprint,
                                             champion_metrics=champ_figures, run_id=run.info.run_id)
        promoted = promotion.promoted
        comparison = mlflow.log_comparison(f"dvae v{version}", promotion, figures_now, dict(config.promote_on),
                                           fingerprint, names=list(figures_now))
        context.log.info(promotion.reason)
        run_url = mlflow.run_url(run)

    final = result.final_metrics
    figures = {**{k: final[k] for k in ("recon", "kl", "total", "temperature", "beta", "usage", "perplexity") if k in final},
               **report.metrics()}
    context.log.info(f"dvae: {json.dumps({k: round(float(v), 4) for k, v in figures.items()})}")
    meta = {
        **(dict(reported.metadata or {}) if reported is not None else {}),
        "steps": result.step,
        "world_size": world,
        "resumed_from": result.resumed_from if result.resumed_from is not None else "none",
        "figures": md(md_table(["metric", "value"], [(k, f"{float(v):.4g}") for k, v in figures.items()])),
        "reconstructions": md(md_image(png_bytes(grid), "originals and reconstructions, side by side")),
        "model_version": f"dvae v{version} @{'champion' if promoted else CHALLENGER}",
        "promotion": promotion.reason,
        "comparison": md(comparison),
        "champion_rescored": rescored or "no",
        "location": dg.MetadataValue.path(store.uri(DVAE_KEY)),
        "mlflow_run": dg.MetadataValue.url(run_url),
    }
    for k in ("caption_match_reconstruction", "caption_match_original", "eval_codebook_usage", "recon_mse"):
        if k in figures:
            meta[k] = round(float(figures[k]), 4)
    return dg.MaterializeResult(metadata=meta)


def rescore_dvae(mlflow: MlflowResource, version: str, images, captions, demo: bool,
                 image_size: int) -> tuple[dict | None, str]:
    """Held-out figures of a registered dVAE version under the current conditions; (None, why)
    when it cannot be scored on these images (then promotion is refused)."""
    try:
        encoder, decoder, old = load_dvae(mlflow.resolve_weights(f"models:/dvae/{version}", "dvae"))
    except Exception as e:  # weights gone from the artifact store, an unloadable file
        return None, f"could not be re-scored: {type(e).__name__}: {e}"
    if old.image_size != image_size:
        return None, f"could not be re-scored: trained for {old.image_size}-px images, the evaluation set is {image_size}-px"
    report = evaluate_reconstructions(encoder, decoder, images, captions, demo_check if demo else None, keep=0)
    return report.metrics(), "re-scored under these conditions"


def train_dvae_torchrun(context, torchrun: TorchrunLauncher, cfg, paths, out, nodes: int, nproc_per_node: int,
                        tracking_uri: str, run_id: str):
    """Data-parallel training: `nodes` x `nproc_per_node` processes under torchrun
    (orchestration/dvae_entry.py) where the `torchrun` resource runs them (this machine, SLURM,
    Kubernetes; `out` on the filesystem they share), rank 0 streaming each logged step to this
    run and to MLflow through Dagster Pipes.
    Returns (TrainResult of the EMA weights rank 0 wrote, the Pipes-reported materialization)."""
    (out / "dvae-config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "shards.json").write_text(json.dumps([str(p) for p in paths]))
    args = ["--config-json", str(out / "dvae-config.json"), "--shards-json", str(out / "shards.json"),
            "--out", str(out)]
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run_id}
    if torchrun.backend == "local":  # this machine's cores shared by its processes (a cluster sets its own)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (nodes * nproc_per_node)))
    reported = torchrun.launch(context, module="orchestration.dvae_entry", args=args, run_dir=out, nnodes=nodes,
                               nproc_per_node=nproc_per_node, env=env, name="dalle-dvae").get_materialize_result()
    summary_file, model_file = out / "result.json", out / "dvae.pt"
    if not (summary_file.exists() and model_file.exists()):
        raise dg.Failure(f"dVAE training ended without {summary_file} / {model_file}; see the run's logs")
    summary = json.loads(summary_file.read_text())
    encoder, decoder, _ = load_dvae(model_file)
    result = TrainResult(encoder=encoder, decoder=decoder, config=cfg, step=summary["step"],
                         history=summary["history"], model_path=model_file,
                         resumed_from=summary["resumed_from"], codebook_init=summary.get("codebook_init"))
    return result, reported


@dg.asset(
    partitions_def=code_shards,  # one run (a pod at scale) per training shard; `shards` registers the keys
    retry_policy=STORAGE_RETRY,
    deps=[dvae, bpe_tokenizer],
    group_name="dvae",
    kinds={"pytorch"},
    description="One shard's images as dVAE token grids (argmax of the champion dVAE's encoder logits) next "
    "to the tokenized caption: what the prior trains on. A shard already encoded from the same source by "
    "the same dVAE and tokenizer is skipped.",
)
def image_codes(context: dg.AssetExecutionContext, storage: StorageResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    store = storage.get()
    require_passing_shards(store)
    shard = source_shard(store, context.partition_key)
    model_file = champion_dvae_file(mlflow)
    encoded_with = codes_encoded_with(store, model_file)
    done = codes.read_done(store, CODES, shard.name)
    if codes.stale_reason(done, shard.sha256, encoded_with) is None:  # resume: already done
        context.log.info(f"image_codes: {shard.name} already encoded with this dVAE and tokenizer")
        return codes_result(store, shard, ShardInfo(**done["info"]), resumed=True)
    encoder, _, cfg = load_dvae(model_file, device=training_device())
    tokenizer = DalleTokenizer.from_json(store.get_text(TOKENIZER_KEY), source=store.uri(TOKENIZER_KEY))
    coded = encode_shard(encoder, tokenizer, cfg.image_size, read_tar(store, f"{SHARDS}/{shard.name}"), shard.name)
    info = codes.write_code_shard(coded, store, f"{CODES}/{shard.name}")
    extra = {"grid": cfg.grid_size, "image_vocab": cfg.vocab_size,
             "text_len": tokenizer.text_len, "text_vocab": tokenizer.total_vocab_size}
    codes.mark_done(store, CODES, info, shard.sha256, encoded_with, extra)
    context.log.info(f"image_codes: {shard.name}: {info.count} pairs")
    return codes_result(store, shard, info, resumed=False,
                        grid=f"{cfg.grid_size}x{cfg.grid_size} codes of {cfg.vocab_size}")


def source_shard(store, name: str) -> ShardInfo:
    """The shards manifest's entry for a code_shards partition."""
    by_name = {s.name: s for s in Manifest.load(store, SHARDS).shards}
    if name not in by_name:
        raise dg.Failure(f"{name} is not in the shards manifest ({', '.join(by_name)}): a stale code_shards "
                         "partition; materialize shards to refresh them")
    return by_name[name]


def codes_encoded_with(store, model_file) -> dict:
    """What a code shard depends on besides its source: the champion dVAE and the tokenizer."""
    return {"dvae_sha256": file_sha256(model_file),
            "tokenizer_sha256": tokenizer_sha256(store)}


def encode_shard(encoder, tokenizer, image_size: int, pairs, shard_name: str, chunk: int = 256) -> list:
    pairs, coded = list(pairs), []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        x = torch.stack([image_to_tensor(p.image, image_size, name=f"{shard_name}:{p.key}") for p in part])
        grid = encode_to_codes(encoder, x).cpu().numpy()
        text = tokenizer.encode_batch([p.caption for p in part]).numpy()
        for p, g, t in zip(part, grid, text):
            coded.append(codes.CodedPair(p.key, p.caption, t, g, {"url": p.meta.get("url"), "source_shard": shard_name}))
    return coded


def codes_result(store, shard, info, resumed: bool, **extra) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={
        "samples": info.count, "source_shard": shard.name, "resumed": resumed, **extra,
        "location": dg.MetadataValue.path(store.uri(f"{CODES}/{shard.name}")),
    })


@dg.asset(
    deps=[image_codes],  # every partition: the manifest is assembled once all shards are coded
    group_name="dvae",
    kinds={"python"},
    description="The manifest of the image codes the prior reads: every shard of `shards`, each encoded by the "
    "champion dVAE and the current tokenizer; refuses, naming them, shards that are missing or stale.",
)
def image_codes_manifest(
    context: dg.AssetExecutionContext, storage: StorageResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    store = storage.get()
    require_passing_shards(store)  # the prior's data: codes of shards that passed their suite, and only those
    encoded_with = codes_encoded_with(store, champion_dvae_file(mlflow))
    try:
        out = codes.assemble_code_manifest(store, CODES, Manifest.load(store, SHARDS), encoded_with)
    except codes.CodeManifestError as e:
        raise dg.Failure(str(e)) from None
    extra = out.extra
    context.log.info(f"image_codes_manifest: {out.total} pairs in {len(out.shards)} shards")
    return dg.MaterializeResult(
        metadata={
            "samples": out.total,
            "shards": len(out.shards),
            "grid": f"{extra['grid']}x{extra['grid']} codes of {extra['image_vocab']}",
            "text": f"{extra['text_len']} tokens of {extra['text_vocab']} (incl. per-position pads)",
            "dvae_sha256": extra["dvae_sha256"][:12],
            "location": dg.MetadataValue.path(store.uri(f"{CODES}/manifest.json")),
        }
    )


def champion_dvae_file(mlflow: MlflowResource):
    """The dVAE every downstream asset uses: `dvae@champion` in the MLflow registry."""
    return mlflow.resolve_weights("@champion", "dvae")
