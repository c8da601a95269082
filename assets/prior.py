"""Stage two of the paper: the transformer prior, trained with torchrun through
Dagster Pipes (rank 0 streams metrics to the run and to MLflow). Where torchrun runs is the
`torchrun` resource's choice (`assets.launchers.TorchrunLauncher`): this machine (the demo),
a SLURM job or a Kubernetes indexed Job, the same Pipes report from each."""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import dagster as dg

from assets.dvae import CODES, config_digest, image_codes_manifest
from assets.launchers import TorchrunLauncher
from assets.metadata import md, md_table
from assets.model_registry import CHALLENGER, DEFAULT_ALIAS, PriorModel
from assets.resources import MlflowResource, ProfileResource, StorageResource, data_version
from assets.text import TOKENIZER_KEY
from dalle_core.data.codes import iter_code_shard
from dalle_core.data.shards import Manifest
from dalle_core.data.loader import local_shard_paths
from dalle_core.prior.baseline import unigram_baseline
from dalle_core.profiles import ProfileMismatchError, resolve_profile, write_resolved_profile
from dalle_core.storage import LocalStorage

PRIOR_KEY = "prior/prior.pt"


class PriorRunConfig(dg.Config):
    """How to launch the training: processes per machine and the logical machine count."""

    nproc_per_node: int = 1  # GPUs per machine on a cluster; CPU processes here (gloo)
    nodes: int = 1  # machines in the mesh (local backend: 4 processes as nodes=2 x 2 on one box in tests;
    # slurm / k8s backends: real machines, one torchrun each)
    powersgd_rank: Optional[int] = None  # compress cross-machine gradients (None: plain all-reduce)
    steps: Optional[int] = None  # default: the profile's
    activation_checkpointing: bool = False
    precision: Optional[str] = None  # fp32 | bf16 | fp16-per-resblock (default: by device)
    fresh: bool = False  # start over instead of resuming from the last checkpoint


def codes_dir(storage: StorageResource, store) -> Path:
    """A local folder with the image-code manifest and shards (downloaded once from S3)."""
    if isinstance(store, LocalStorage):
        return store.path(CODES)
    cache = storage.scratch("image-codes-cache")
    local_shard_paths(store, CODES, cache_dir=cache)
    store.get_file(f"{CODES}/manifest.json", cache / "manifest.json")
    # the tokenizer travels with the codes: the trainer re-encodes captions with BPE dropout
    # (dalle_core.prior.data.prior_tokenizer finds it next to the manifest)
    store.get_file(TOKENIZER_KEY, cache / "tokenizer.json")
    return cache


@dg.asset(
    deps=[image_codes_manifest],
    group_name="prior",
    kinds={"pytorch"},
    description="Decoder-only sparse transformer over 'text then image' tokens (row/column/conv "
    "masks; text and image loss weighted as the profile says, the paper's 1/8 and 7/8), trained with "
    "torchrun; registered in MLflow as `prior`.",
)
def prior(
    context: dg.AssetExecutionContext,
    config: PriorRunConfig,
    storage: StorageResource,
    profile: ProfileResource,
    mlflow: MlflowResource,
    torchrun: TorchrunLauncher,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    data = codes_dir(storage, store)
    manifest = json.loads((data / "manifest.json").read_text())
    source = store.uri(f"{CODES}/manifest.json")
    try:  # the profile against the sizes the codes were made with (grid, vocabularies, text positions)
        prof = resolve_profile(prof, manifest, source)
    except ProfileMismatchError as e:
        raise dg.Failure(str(e)) from e
    # model + training settings, one flat dict: the run folder's digest (as before the split) and MLflow params
    cfg = {**prof.prior.to_dict(), **prof.prior_training.to_dict()}
    # the run folder is keyed on the model, the launch and the codes (every code shard, the dVAE and the
    # tokenizer they were made with): a rerun on the same codes resumes (a finished run is loaded back),
    # new data (the retrain after it landed), a new dVAE or tokenizer trains afresh
    run_key = {"model": cfg, "steps": config.steps, "world": config.nproc_per_node * config.nodes,
               "powersgd_rank": config.powersgd_rank, "codes": Manifest.from_dict(manifest).content_digest()}
    out = storage.scratch(f"prior-runs/{config_digest(run_key)}")
    if config.fresh:
        shutil.rmtree(out)
        out.mkdir(parents=True)
    # the one launch path: the resolved profile as the trainer's --profile-json (as `dalle
    # train-prior`, the SLURM script and the k8s Job hand it over)
    write_resolved_profile(prof, manifest, out / "profile.json", source)
    baseline = unigram_baseline(p for s in manifest["shards"] for p in iter_code_shard(data / s["name"]))

    world = config.nproc_per_node * config.nodes
    args = ["--profile-json", str(out / "profile.json"), "--codes", str(data), "--out", str(out), "--quiet"]
    if world > 1:
        args += ["--nodes", str(config.nodes), "--gpus-per-node", str(config.nproc_per_node)]
    for flag, value in (("--steps", config.steps), ("--powersgd-rank", config.powersgd_rank),
                        ("--precision", config.precision)):
        if value is not None:
            args += [flag, str(value)]
    if config.activation_checkpointing:
        args.append("--activation-checkpointing")

    with mlflow.start_run("prior", tags={"stage": "prior", "profile": prof.name}, data_version=data_version(store)) as run:
        mlflow.log_params({**{k: v for k, v in cfg.items() if not isinstance(v, (list, dict))},
                           "world_size": world, "nodes": config.nodes, "powersgd_rank": config.powersgd_rank})
        mlflow.log_metrics({f"unigram_{k}": v for k, v in baseline.items()})
        env = {"MLFLOW_TRACKING_URI": mlflow.tracking_uri, "MLFLOW_RUN_ID": run.info.run_id}
        if torchrun.backend == "local":  # this machine's cores shared by its processes (a cluster sets its own)
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
        # local: every process here (--standalone); slurm / k8s: `nodes` machines x nproc_per_node, the run
        # folder (on the shared filesystem) holds the job's script/manifests, log and Pipes files
        reported = torchrun.launch(context, module="orchestration.prior_entry", args=args, run_dir=out,
                                   nnodes=config.nodes, nproc_per_node=config.nproc_per_node, env=env,
                                   name="dalle-prior").get_materialize_result()
        model_file = out / "prior.pt"
        if not model_file.exists():
            raise dg.Failure(f"training ended without {model_file}; see the run's logs")
        store.put_file(PRIOR_KEY, model_file)
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        steps = [r for r in records if "loss" in r or "loss/image" in r or "image_loss" in r]
        last = steps[-1] if steps else {}
        final = {k: last[k] for k in last if isinstance(last[k], (int, float)) and "loss" in k}
        image_loss = next((v for k, v in final.items() if "image" in k), None)
        # the ratio is undefined when every image token is the same code (a collapsed
        # dVAE: unigram entropy 0); the run still lands, without the ratio
        ratio = image_loss / baseline["image"] if image_loss is not None and baseline["image"] > 0 else None
        if ratio is not None:
            mlflow.log_metric("image_loss_over_unigram", ratio)
        else:
            context.log.warning(f"image-token unigram entropy is {baseline['image']:.3g}: the dVAE codes "
                                "hardly vary, so the prior has little to learn (check the dvae asset's codebook usage)")
        # the tokenizer travels with the prior: `dalle generate --prior @champion` needs both
        tokenizer_file = store.get_file(TOKENIZER_KEY, storage.scratch("prior-tokenizer") / "bpe_tokenizer.json")
        # a challenger until the zero-shot report compares it with the champion (the first one is champion)
        version = mlflow.log_and_register(model_file, "prior", PriorModel(), alias=CHALLENGER,
                                          extra_artifacts={"tokenizer": tokenizer_file})
        if mlflow.champion_version("prior") is None:
            mlflow.set_alias("prior", DEFAULT_ALIAS, version)
        run_url = mlflow.run_url(run)

    curve = [(r.get("step"), *(f"{r[k]:.3f}" for k in sorted(final))) for r in steps[:: max(1, len(steps) // 8)]]
    meta = dict(reported.metadata or {}) if reported is not None else {}
    meta.update({
        "world_size": world,
        "unigram_baseline": md(md_table(["tokens", "nats"], [(k, f"{v:.3f}") for k, v in baseline.items()])),
        "loss_curve": md(md_table(["step", *sorted(final)], curve)),
        "model_version": f"prior v{version} @{CHALLENGER}",
        "location": dg.MetadataValue.path(store.uri(PRIOR_KEY)),
        "mlflow_run": dg.MetadataValue.url(run_url),
    })
    if image_loss is not None:
        meta["image_loss"] = round(float(image_loss), 4)
        meta["image_unigram"] = round(baseline["image"], 4)
    if ratio is not None:
        meta["image_loss_over_unigram"] = round(ratio, 4)
    return dg.MaterializeResult(metadata=meta)
