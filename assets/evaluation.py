"""Zero-shot evaluation (paper section 3.2): generate for the evaluation captions
(MS-COCO format), then FID / IS with blur when Inception weights are configured,
and always the Frechet distance and precision / recall in the platform's own
contrastive space, plus the demo world's caption-match rate."""

import json
import os
import time
from typing import Dict, List

import dagster as dg
import torch

from assets.data import coco_eval_set, load_eval_images
from assets.dvae import demo_check, training_device
from assets.generation import load_text_to_image, samples
from assets.metadata import md, md_image, md_table
from dalle_core.data.demo_world import check_image, parse_caption
from dalle_core.eval import FeatureCache, InceptionMetrics, render_report, zero_shot_metrics
from dalle_core.eval.generated import generate_best_images, weights_digest
from dalle_core.eval.inception import WEIGHTS_ENV
from dalle_core.eval.report import numeric_metrics
from dalle_core.storage import open_storage
from orchestration.model_registry import promote_if_better
from orchestration.resources import MlflowResource, ProfileResource, StorageResource, data_version

REPORTS = "reports/zero_shot"
STAGE = "coco_zero_shot_report"


class ZeroShotConfig(dg.Config):
    captions: int = 0  # evaluation captions used; 0 = all (the paper: 30,000 MS-COCO val captions)
    candidates: int = 8  # samples per caption, the reranker keeps the best one (the paper: 512 -> 1)
    radii: List[float] = [1.0, 2.0, 4.0, 8.0]  # Gaussian blur of both sets, as the paper plotted
    inception_weights: str = ""  # path or s3:// URI of torch-fidelity's Inception weights (default: $DALLE_INCEPTION_WEIGHTS)
    seed: int = 0
    batch_captions: int = 32  # captions sampled together
    # champion / challenger: the newly trained prior becomes champion only if it beats it on all of these
    promote_on: Dict[str, str] = {"contrastive_fd": "lower"}


def resolve_inception(spec: str, storage: StorageResource):
    """InceptionMetrics from a local path or an s3:// object (downloaded once), or NotComputed."""
    spec = spec or os.environ.get(WEIGHTS_ENV, "")
    if spec.startswith("s3://"):
        base, _, name = spec.rpartition("/")
        local = storage.scratch("inception") / name
        if not local.exists():
            open_storage(base, endpoint_url=storage.endpoint_url).get_file(name, local)
        spec = str(local)
    return InceptionMetrics.from_weights(spec or None)


def earlier_reports(mlflow_resource: MlflowResource, limit: int = 5) -> list[dict]:
    """The latest earlier zero-shot runs, for the report's comparison table."""
    import mlflow as mlf

    mlf.set_tracking_uri(mlflow_resource.tracking_uri)
    exp = mlf.get_experiment_by_name(mlflow_resource.experiment)
    if exp is None:
        return []
    runs = mlf.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{STAGE}'",
                           order_by=["attributes.start_time DESC"], max_results=limit, output_format="list")
    return [{"version": f"prior v{r.data.tags['prior_version']}" if r.data.tags.get("prior_version") else r.info.run_id[:8],
             "metrics": dict(r.data.metrics)}
            for r in runs]


def newest_version(name: str, mlflow_resource: MlflowResource):
    """The latest registered version of a model (the prior the `prior` asset just
    registered as challenger); None when none is registered."""
    import mlflow as mlf

    mlf.set_tracking_uri(mlflow_resource.tracking_uri)
    try:
        versions = mlf.MlflowClient().search_model_versions(f"name = '{name}'")
    except Exception:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


@dg.asset(
    deps=[samples, coco_eval_set],
    group_name="evaluation",
    kinds={"pytorch"},
    description="Zero-shot report on the evaluation captions (MS-COCO format): FID / IS with blur "
    "radii 1-8 when Inception weights are configured, Frechet distance and precision / recall in "
    "the contrastive model's space always, caption match on the demo world; HTML report in MLflow.",
)
def coco_zero_shot_report(
    context: dg.AssetExecutionContext, config: ZeroShotConfig, storage: StorageResource,
    profile: ProfileResource, mlflow: MlflowResource,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    inception = resolve_inception(config.inception_weights, storage)
    chain = load_text_to_image(store, storage, mlflow, device=training_device())
    eval_set = load_eval_images(store, prof.dvae.image_size, storage.scratch("eval-cache"))
    if config.captions:
        eval_set = eval_set[: config.captions]
    if len(eval_set) < 2:
        raise dg.Failure("the evaluation set needs at least 2 captions")
    captions = [c for _, c in eval_set]
    references = [im for im, _ in eval_set]

    # generate: N candidates per caption, the reranker's best kept (the paper's protocol),
    # in chunks kept on disk: a killed evaluation's rerun generates only what is missing
    t0, resumed = time.monotonic(), []

    def generation_progress(done: int, total: int, from_disk: bool) -> None:
        resumed.append(from_disk)
        context.log.info(f"zero-shot: generated {done}/{total} ({'from an earlier run' if from_disk else 'new'}, "
                         f"{time.monotonic() - t0:.0f}s)")

    generated = generate_best_images(chain, captions, config.candidates, config.batch_captions, config.seed,
                                     cache_dir=storage.scratch("zero-shot-generated"), progress=generation_progress)

    reranker = chain.reranker
    # the features are cached per reranker version: name it by the weights actually loaded
    # (the champion), not by the newest file in storage, which may not have been promoted
    rr_id = weights_digest(reranker)[:16]

    def contrastive(x: torch.Tensor) -> torch.Tensor:
        return reranker.image_features(x)

    def progress(stage: str, done: int, total: int) -> None:
        if done == total:
            context.log.info(f"zero-shot: {stage} features {done}/{total}")

    metrics = zero_shot_metrics(generated, references, contrastive, inception=inception,
                                radii=(0, *config.radii), progress=progress,
                                cache=FeatureCache(storage.scratch("eval-features")), contrastive_id=f"reranker-{rr_id}")
    demo = all(parse_caption(c) is not None for c in captions)
    if demo:
        checks = [check_image(im, c) for im, c in zip(generated, captions)]
        metrics["caption_match"] = sum(r.match for r in checks) / len(captions)
        metrics["colour_match"] = sum(r.colours for r in checks) / len(captions)  # partial credit
        metrics["caption_match_reference"] = sum(demo_check(im, c) for im, c in zip(references, captions)) / len(captions)
    metrics["num_captions"] = float(len(captions))
    metrics["candidates_per_caption"] = float(config.candidates)

    history = earlier_reports(mlflow)  # before this run is logged
    shown = [{"caption": c, "generated": [g], "reference": r}
             for c, g, r in list(zip(captions, generated, references))[:12]]
    report = render_report(metrics, samples=shown, history=history,
                           settings={"captions": str(len(captions)), "candidates per caption": str(config.candidates),
                                     "profile": prof.name}, version="this run")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    store.put_text(f"{REPORTS}/{stamp}.html", report.html)
    store.put_text(f"{REPORTS}/latest.html", report.html)
    numbers = numeric_metrics(metrics)
    store.put_text(f"{REPORTS}/latest.json", json.dumps({"metrics": numbers, "not_computed": metrics.get("not_computed", {})},
                                                        indent=1))

    prior_version = newest_version("prior", mlflow)
    with mlflow.start_run(STAGE, tags={"stage": STAGE, "profile": prof.name, "prior_version": prior_version or ""},
                          data_version=data_version(store)) as run:
        import mlflow as mlf

        mlf.log_params({k: v for k, v in config.model_dump().items() if k != "inception_weights"}
                       | {"inception": "configured" if isinstance(inception, InceptionMetrics) else "not configured"})
        mlf.log_metrics(numbers)
        mlf.log_text(report.html, "report/zero_shot.html")
        for name, reason in metrics.get("not_computed", {}).items():
            mlf.set_tag(f"not_computed.{name}", reason[:250])
        if report.plot_png:
            from PIL import Image
            import io

            mlf.log_image(Image.open(io.BytesIO(report.plot_png)), "report/fd_vs_blur.png")
        promoted, promotion = (False, "no registered prior to promote")
        if prior_version is not None:
            promoted, promotion = promote_if_better("prior", prior_version, numbers, dict(config.promote_on))
            mlf.set_tag("promotion", promotion[:250])
        context.log.info(promotion)
        run_url = mlflow.run_url(run)

    main = [k for k in ("fid", "inception_score", "contrastive_fd", "contrastive_precision", "contrastive_recall",
                        "caption_match", "colour_match", "caption_match_reference") if k in numbers]
    meta = {
        "metrics": md(md_table(["metric", "value"], [(k, f"{numbers[k]:.4g}") for k in numbers]
                               + [(k, f"not computed: {r}") for k, r in metrics.get("not_computed", {}).items()])),
        "report": dg.MetadataValue.path(store.uri(f"{REPORTS}/{stamp}.html")),
        "mlflow_run": dg.MetadataValue.url(run_url),
        "captions": len(captions),
        "resumed_chunks": f"{sum(resumed)} of {len(resumed)}",
        "prior_version": f"prior v{prior_version}" if prior_version else "unregistered",
        "promotion": promotion,
    }
    if report.plot_png:
        meta["fd_vs_blur"] = md(md_image(report.plot_png, "Frechet distance vs blur radius"))
    meta.update({k: round(numbers[k], 4) for k in main})
    context.log.info("zero-shot: " + json.dumps({k: round(numbers[k], 4) for k in main}))
    return dg.MaterializeResult(metadata=meta)
