"""Zero-shot evaluation (paper section 3.2): generate for the evaluation captions
(MS-COCO format), then FID / IS with blur when Inception weights are configured,
and always the Frechet distance and precision / recall in the platform's own
contrastive space, plus the demo world's caption-match figures: the reranked best-of-N, the first
draw and any-of-N, and per-attribute rates, on the held-out captions and on a
sample of training captions, with a one-line diagnosis of what falls short."""

import json
import os
import random
import time
from typing import Dict, List, Optional

import dagster as dg

from assets.data import SHARDS, coco_eval_set, load_eval_images
from assets.dvae import demo_check, training_device
from assets.generation import describe_versions, load_prior_version, load_text_to_image, samples, sampling_of
from assets.metadata import md, md_image, md_table
from assets.model_registry import CHALLENGER
from assets.resources import MlflowResource, ProfileResource, StorageResource, code_version, data_version
from dalle_core.data import shards as shard_io
from dalle_core.demo.checker import check_image
from dalle_core.demo.scenes import parse_caption, split_of
from dalle_core.eval import FeatureCache, InceptionMetrics, render_report, zero_shot_metrics
from dalle_core.eval.caption_match import COUNTS as CAPTION_MATCH_COUNTS, DESCRIPTIONS as CAPTION_MATCH_DESCRIPTIONS
from dalle_core.eval.caption_match import caption_match_figures, diagnose
from dalle_core.eval.fairness import comparison_table, digest_texts, fingerprint_id, make_fingerprint
from dalle_core.eval.generated import generate_judged, weights_digest
from dalle_core.eval.images import image_set_digest
from dalle_core.eval.inception import WEIGHTS_ENV
from dalle_core.eval.report import numeric_metrics
from dalle_core.eval.zero_shot import describe_metric
from dalle_core.generation import TextToImage
from dalle_core.prior.config import SamplingConfig
from dalle_core.prior.sampling import guidance_refusal
from dalle_core.rerank import load_reranker
from dalle_core.storage import open_storage

REPORTS = "reports/zero_shot"
STAGE = "coco_zero_shot_report"


class ZeroShotConfig(dg.Config):
    captions: int = 0  # evaluation captions used; 0 = all (the paper: 30,000 MS-COCO val captions)
    # samples per caption, the reranker keeps the best one (the paper: 512 -> 1); None: the
    # profile's `sampling.candidates` (16 on small, 8 on tiny, 32 on medium, 512 on the paper's)
    candidates: Optional[int] = None
    radii: List[float] = [1.0, 2.0, 4.0, 8.0]  # Gaussian blur of both sets, as the paper plotted
    inception_weights: str = ""  # path or s3:// URI of torch-fidelity's Inception weights (default: $DALLE_INCEPTION_WEIGHTS)
    seed: int = 0
    batch_captions: int = 32  # captions sampled together
    # champion / challenger: the newly trained prior becomes champion only if it beats it on all of these
    promote_on: Dict[str, str] = {"contrastive_fd": "lower"}
    # the prior evaluated: a registered version ("7") or alias; default the challenger, which the
    # `prior` asset points at the version it just registered (never "the newest file in storage")
    prior: str = "@" + CHALLENGER
    # without figures of the champion under this evaluation's fingerprint, score it too in this run
    # (same captions, seed, candidates, scorer); False: refuse the promotion instead, with the reason
    rescore_champion: bool = True
    # a second contrastive model (weights path, models:/reranker/3, @alias) that did not select the
    # samples: its Frechet distance is reported as independent_fd (and is part of the fingerprint)
    independent_reranker: str = ""
    # demo world: caption-match figures also on this many training captions (a fixed-seed sample of
    # the shards' captions), beside the held-out ones, to tell generalisation from the prior; 0 = off.
    # 32 x 8 draws: ~7 s of the demo (64 took 14 s of its 10-minute budget)
    train_captions: int = 32
    # how the prior is drawn; None: the profile's `sampling` (the paper's temperature 1 except
    # where a profile measured better: medium 0.7). Part of the fingerprint when not the paper's.
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    guidance_scale: Optional[float] = None  # classifier-free guidance; None: the profile's


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


def earlier_reports(mlflow: MlflowResource, limit: int = 5) -> list[dict]:
    """The latest earlier zero-shot runs, for the report's comparison table."""
    runs = mlflow.search_runs(f"tags.stage = '{STAGE}'", max_results=limit)
    # heldout/..., train/...: the caption-match diagnoses have their own table, not the history's
    return [{"version": f"prior v{r.data.tags['prior_version']}" if r.data.tags.get("prior_version") else r.info.run_id[:8],
             "metrics": {k: v for k, v in r.data.metrics.items() if "/" not in k}}
            for r in runs]


TRAIN_SEED_OFFSET = 1_000_003  # the training captions' draws: seeds apart from the held-out ones'


def sample_train_captions(store, count: int, seed: int, tokenizer, pool_factor: int = 8) -> list[str]:
    """`count` distinct demo-world training captions, a fixed-seed sample of the first
    `count * pool_factor` such captions of the shards (in manifest order: the shards are
    shuffled when written), read only as far as needed. Held-out and validation
    compositions are never in the shards; a caption the prior cannot take whole is skipped."""
    if count <= 0:
        return []
    pool: dict[str, None] = {}
    pairs = shard_io.read_shards(store, SHARDS)
    try:
        for pair in pairs:
            caption = pair.caption
            if caption not in pool and parse_caption(caption) is not None and split_of(caption) == "train":
                pool[caption] = None
                if len(pool) >= count * pool_factor:
                    break
    finally:
        pairs.close()
    captions = list(pool)
    if captions:
        _, truncated = tokenizer.encode_batch_with_info(captions)
        captions = [c for c, t in zip(captions, truncated.tolist()) if not t]
    return random.Random(seed).sample(captions, min(count, len(captions)))


def evaluate_chain(chain: TextToImage, captions: list[str], references: list, config: ZeroShotConfig, inception,
                   storage: StorageResource, independent=None, log=None,
                   train_captions: list[str] | None = None,
                   sampling: SamplingConfig | None = None) -> tuple[dict, list]:
    """The zero-shot figures of one generation chain: N candidates per caption, the reranker's
    best kept (the paper's protocol), generated in chunks kept on disk (a killed evaluation's
    rerun generates only what is missing), then the metrics. Returns (metrics, generated).

    On demo-world captions every candidate is judged by the checker: metrics["caption_figures"]
    holds {"heldout": figures, "train": figures (with `train_captions`)} of
    `dalle_core.eval.caption_match`, and the one-line diagnosis under "diagnosis"."""
    t0, resumed = time.monotonic(), []

    def progress_of(what: str):
        def generation_progress(done: int, total: int, from_disk: bool) -> None:
            resumed.append(from_disk)
            if log:
                log(f"zero-shot: generated {done}/{total} {what} ({'from an earlier run' if from_disk else 'new'}, "
                    f"{time.monotonic() - t0:.0f}s)")
        return generation_progress

    demo = all(parse_caption(c) is not None for c in captions)
    cache_dir = storage.scratch("zero-shot-generated")
    heldout = generate_judged(chain, captions, config.candidates, config.batch_captions, config.seed,
                              cache_dir=cache_dir, progress=progress_of("held-out"),
                              judge=check_image if demo else None, sampling=sampling)
    generated = heldout.best
    figures = {}
    if demo:
        figures["heldout"] = caption_match_figures(heldout.judgements)
        if train_captions:
            train = generate_judged(chain, train_captions, config.candidates, config.batch_captions,
                                    config.seed + TRAIN_SEED_OFFSET, cache_dir=cache_dir,
                                    progress=progress_of("training-caption"), judge=check_image,
                                    sampling=sampling)
            figures["train"] = caption_match_figures(train.judgements)
    reranker = chain.reranker
    # the features are cached per model: named by the weights actually loaded
    rr_id = weights_digest(reranker)[:16]

    def progress(stage: str, done: int, total: int) -> None:
        if done == total and log:
            log(f"zero-shot: {stage} features {done}/{total}")

    metrics = zero_shot_metrics(generated, references, reranker.image_features, inception=inception,
                                radii=(0, *config.radii), progress=progress,
                                cache=FeatureCache(storage.scratch("eval-features")), contrastive_id=f"reranker-{rr_id}",
                                independent_features_fn=independent.image_features if independent is not None else None,
                                independent_id=f"reranker-{weights_digest(independent)[:16]}" if independent is not None else None)
    if demo:  # the checks of the reranker's picks, as judged with the other candidates
        metrics["caption_match"] = figures["heldout"]["caption_match_reranked"]
        metrics["colour_match"] = figures["heldout"]["picked_colour_rate"]  # partial credit
        metrics["caption_match_reference"] = sum(demo_check(im, c) for im, c in zip(references, captions)) / len(captions)
        metrics["caption_figures"] = figures
        metrics["diagnosis"] = diagnose(figures["heldout"], figures.get("train"))
    metrics["num_captions"] = float(len(captions))
    metrics["candidates_per_caption"] = float(config.candidates)
    metrics["resumed_chunks"] = (sum(resumed), len(resumed))
    return metrics, generated


def evaluation_fingerprint(chain: TextToImage, captions: list[str], references: list, config: ZeroShotConfig,
                           inception, independent=None, sampling: SamplingConfig | None = None) -> dict[str, str]:
    """Everything the figures depend on besides the prior under test: the captions and
    reference images, candidates, seed, chunking (it sets each caption's seed), radii, the
    weights of the scoring models (the reranker selects the samples and defines the feature
    space; Inception; the independent model) and of the dVAE decoder, the code, and the
    sampling where it departs from the paper's (so figures recorded before it existed keep
    their fingerprint)."""
    changed = (sampling or SamplingConfig()).key()
    return make_fingerprint(
        **{f"sampling_{k}": v for k, v in changed.items()},
        evaluation="zero-shot", captions=digest_texts(captions), references=image_set_digest(references),
        candidates=config.candidates, seed=config.seed, batch_captions=config.batch_captions,
        radii=[0.0, *config.radii], scorer=weights_digest(chain.reranker),
        inception=inception.extractor_id if isinstance(inception, InceptionMetrics) else "not computed",
        independent=weights_digest(independent) if independent is not None else "none",
        decoder=weights_digest(chain.decoder), code_version=code_version())


def caption_match_table(figures: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each caption-match figure on held-out and on training captions."""
    splits = [s for s in ("heldout", "train") if s in figures]
    names = [k for k in CAPTION_MATCH_DESCRIPTIONS if any(k in figures[s] for s in splits)]
    header = ["figure"] + [{"heldout": "held-out captions", "train": "training captions"}[s] for s in splits]

    def cell(split: str, name: str) -> str:
        v = figures[split].get(name)
        return "-" if v is None else f"{v:.0f}" if name in CAPTION_MATCH_COUNTS else f"{v:.3f}"

    return header, [[k] + [cell(s, k) for s in splits] for k in names]


MAIN = ("fid", "inception_score", "contrastive_fd", "independent_fd", "contrastive_precision", "contrastive_recall",
        "caption_match", "colour_match", "caption_match_reference")


@dg.asset(
    deps=[samples, coco_eval_set],
    group_name="evaluation",
    kinds={"pytorch"},
    description="Zero-shot report on the evaluation captions (MS-COCO format) of a registered prior version "
    "(default the challenger the `prior` asset just registered): FID / IS with blur radii 1-8 when Inception "
    "weights are configured, Frechet distance and precision / recall in the reranker's own space (the model "
    "that selected the samples) always, in an independent contrastive model's space when configured, caption "
    "match on the demo world; the champion is scored under the same fingerprint when it has no figures under "
    "it, and the challenger promoted only on a same-fingerprint win; HTML report in MLflow.",
)
def coco_zero_shot_report(
    context: dg.AssetExecutionContext, config: ZeroShotConfig, storage: StorageResource,
    profile: ProfileResource, mlflow: MlflowResource,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    inception = resolve_inception(config.inception_weights, storage)
    device = training_device()
    chain, versions = load_text_to_image(store, storage, mlflow, device=device, prior=config.prior)
    prior_version = versions["prior"]
    independent = (load_reranker(mlflow.resolve_weights(config.independent_reranker, "reranker"), device=device).eval()
                   if config.independent_reranker else None)
    eval_set = load_eval_images(store, prof.dvae.image_size, storage.scratch("eval-cache"))
    if config.captions:
        eval_set = eval_set[: config.captions]
    if len(eval_set) < 2:
        raise dg.Failure("the evaluation set needs at least 2 captions")
    captions = [c for _, c in eval_set]
    references = [im for im, _ in eval_set]
    sampling = sampling_of(config, prof)
    if refusal := guidance_refusal(chain.prior, sampling.guidance_scale):
        raise dg.Failure(f"prior v{prior_version}: {refusal}")
    config = config.model_copy(update={"candidates": sampling.candidates})  # every figure below names the N drawn
    fingerprint = evaluation_fingerprint(chain, captions, references, config, inception, independent, sampling)
    fp = fingerprint_id(fingerprint)
    champ = mlflow.champion_version("prior")
    role = "champion" if champ == prior_version else CHALLENGER
    evaluated = f"prior v{prior_version} ({role})" + (f" vs champion v{champ}" if champ and champ != prior_version else "")
    context.log.info(f"zero-shot: {evaluated}, fingerprint {fp} ({describe_versions(mlflow, versions)})")

    demo = all(parse_caption(c) is not None for c in captions)
    train_captions = (sample_train_captions(store, config.train_captions, config.seed, chain.tokenizer)
                      if demo and config.train_captions > 0 else [])
    metrics, generated = evaluate_chain(chain, captions, references, config, inception, storage, independent,
                                        log=context.log.info, train_captions=train_captions, sampling=sampling)
    resumed = metrics.pop("resumed_chunks")
    caption_figures, diagnosis = metrics.pop("caption_figures", {}), metrics.pop("diagnosis", None)
    numbers = numeric_metrics(metrics)
    # stable MLflow names: heldout/<figure>, train/<figure> (dalle_core.eval.caption_match.DESCRIPTIONS)
    diagnostics = {f"{split}/{k}": v for split, figures in caption_figures.items() for k, v in figures.items()}
    if diagnosis:
        context.log.info(f"zero-shot: {diagnosis}")

    # the champion under the same conditions: its recorded figures under this fingerprint, else
    # scored now with the same captions, seed, candidates and scorers (unless configured not to)
    champ_numbers, rescored = None, "no"
    if champ is not None and champ != prior_version:
        stored = mlflow.champion_figures("prior", champ, fingerprint)
        if stored is not None and all(k in stored for k in config.promote_on):
            rescored = f"no: figures under fingerprint {fp} recorded"
        elif config.rescore_champion:
            champ_prior, champ_tok, _ = load_prior_version(mlflow, champ, store, device=device)
            if refusal := guidance_refusal(champ_prior, sampling.guidance_scale):
                # e.g. a guided evaluation of a challenger trained with caption dropout against a
                # champion trained without: no same-condition figures can exist, promotion is refused
                rescored = f"no: champion v{champ} cannot be drawn under these conditions ({refusal})"
            else:
                champ_chain = TextToImage(champ_prior, chain.decoder, champ_tok, reranker=chain.reranker,
                                          encoder=chain.encoder)
                context.log.info(f"zero-shot: scoring champion prior v{champ} under fingerprint {fp}")
                champ_metrics, _ = evaluate_chain(champ_chain, captions, references, config, inception, storage,
                                                  independent, log=context.log.info, sampling=sampling)
                champ_metrics.pop("resumed_chunks")
                champ_metrics.pop("caption_figures", None)
                champ_metrics.pop("diagnosis", None)
                champ_numbers = numeric_metrics(champ_metrics)
                rescored = f"yes: champion v{champ} scored in this run under fingerprint {fp}"
        else:
            rescored = "no (rescore_champion is off): promotion refused without same-fingerprint figures"

    history = earlier_reports(mlflow)  # before this run is logged
    shown = [{"caption": c, "generated": [g], "reference": r}
             for c, g, r in list(zip(captions, generated, references))[:12]]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with mlflow.start_run(STAGE, tags={"stage": STAGE, "profile": prof.name, "prior_version": prior_version,
                                       "evaluated": evaluated}, data_version=data_version(store)) as run:
        mlflow.log_params({k: v for k, v in config.model_dump().items() if k not in ("inception_weights", "independent_reranker")}
                          | {"inception": "configured" if isinstance(inception, InceptionMetrics) else "not configured",
                             "independent_reranker": "configured" if independent is not None else "none"}
                          | sampling.to_dict())  # the temperature / top-k as drawn, not the config's None
        mlflow.log_metrics(numbers)
        if diagnostics:
            mlflow.log_metrics(diagnostics | {"train/num_captions": float(len(train_captions))})
            mlflow.set_tag("diagnosis", diagnosis[:250])
        for name, reason in metrics.get("not_computed", {}).items():
            mlflow.set_tag(f"not_computed.{name}", reason[:250])
        for name in ("contrastive_fd", "independent_fd"):
            if name in numbers:
                mlflow.set_tag(f"metric_note.{name}", describe_metric(name))
        promotion = mlflow.promote_if_better("prior", prior_version, numbers, dict(config.promote_on), fingerprint,
                                             champion_metrics=champ_numbers, run_id=run.info.run_id)
        names = [k for k in MAIN if k in numbers]
        comparison = mlflow.log_comparison(f"prior v{prior_version}", promotion, numbers, dict(config.promote_on),
                                           fingerprint, names=names)
        champ_label = f"champion v{promotion.champion}" if promotion.champion else "champion"
        caption_table = caption_match_table(caption_figures)
        report = render_report(
            metrics, samples=shown, history=history, version=f"prior v{prior_version}",
            settings={"captions": str(len(captions)), "candidates per caption": str(config.candidates),
                      "sampling": f"temperature {sampling.temperature}, top-k {sampling.top_k or 'all'}"
                                  + (f", guidance {sampling.guidance_scale}" if sampling.guidance_scale != 1.0 else ""),
                      "profile": prof.name, "evaluated": evaluated, "fingerprint": fp,
                      **{f"fingerprint.{k}": v for k, v in fingerprint.items()}},
            descriptions={k: describe_metric(k) for k in numbers},
            comparison={"title": f"prior v{prior_version} vs {champ_label} (fingerprint {fp})",
                        "header": ["metric", f"prior v{prior_version}", champ_label, "rule"],
                        "rows": comparison_table("", "", numbers, promotion.champion_metrics, dict(config.promote_on),
                                                 names),
                        "note": promotion.reason},
            caption_match={"title": "Caption match: held-out vs training captions",
                           "header": caption_table[0], "rows": caption_table[1], "note": diagnosis or "",
                           "descriptions": CAPTION_MATCH_DESCRIPTIONS} if caption_figures else None)
        mlflow.log_text(report.html, "report/zero_shot.html")
        if report.plot_png:
            from PIL import Image
            import io

            mlflow.log_image(Image.open(io.BytesIO(report.plot_png)), "report/fd_vs_blur.png")
        context.log.info(promotion.reason)
        run_url = mlflow.run_url(run)
    store.put_text(f"{REPORTS}/{stamp}.html", report.html)
    store.put_text(f"{REPORTS}/latest.html", report.html)
    store.put_text(f"{REPORTS}/latest.json", json.dumps({"metrics": numbers, "not_computed": metrics.get("not_computed", {}),
                                                        "caption_match": caption_figures, "diagnosis": diagnosis,
                                                        "evaluated": evaluated, "fingerprint": fingerprint,
                                                        "promotion": promotion.reason}, indent=1))

    meta = {
        "metrics": md(md_table(["metric", "value", "what it measures"],
                               [(k, f"{numbers[k]:.4g}", describe_metric(k)) for k in numbers]
                               + [(k, f"not computed: {r}", "") for k, r in metrics.get("not_computed", {}).items()])),
        "report": dg.MetadataValue.path(store.uri(f"{REPORTS}/{stamp}.html")),
        "mlflow_run": dg.MetadataValue.url(run_url),
        "captions": len(captions),
        "resumed_chunks": f"{resumed[0]} of {resumed[1]}",
        "prior_version": f"prior v{prior_version}",
        "evaluated": evaluated,
        "models": describe_versions(mlflow, versions),
        "fingerprint": fp,
        "fingerprint_fields": md(md_table(["field", "value"], sorted(fingerprint.items()))),
        "champion_rescored": rescored,
        "comparison": md(comparison),
        "promotion": promotion.reason,
        "promoted": promotion.promoted,
    }
    if caption_figures:
        meta["caption_match_diagnosis"] = md(md_table(*caption_table) + f"\n\n**Diagnosis**: {diagnosis}")
        meta["diagnosis"] = diagnosis
        meta["train_captions"] = len(train_captions)
        meta["candidates"] = config.candidates
        meta.update({k: round(v, 4) for k, v in diagnostics.items()})
    if report.plot_png:
        meta["fd_vs_blur"] = md(md_image(report.plot_png, "Frechet distance vs blur radius"))
    meta.update({k: round(numbers[k], 4) for k in names})
    context.log.info("zero-shot: " + json.dumps({k: round(numbers[k], 4) for k in names}))
    return dg.MaterializeResult(metadata=meta)
