"""`make demo`: the whole lineage on the built-in demo world, on a persistent
Dagster instance so that `make ui` shows every run, asset and check afterwards."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from orchestration.settings import Settings

DAGSTER_YAML = """\
# Local Dagster instance of the demo (SQLite under this folder).
# Production: see infra/dagster.yaml (Postgres storage, k8s run launcher).
telemetry:
  enabled: false
"""


def prepare_instance(settings: Settings):
    """Point DAGSTER_HOME (and the rest of the settings) at the run directory."""
    from dagster import DagsterInstance

    os.environ.update(settings.export())
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = settings.dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    return DagsterInstance.get()


# Where the small profile's 10-minute budget was set (2026-12-01, the 2-core machine idle): a run on a
# machine that multiplies slower takes longer in proportion (docs/runs.md), hence the probe below.
BUDGET_SET_AT = "the small profile's 10-minute budget was set at fp32 ~200 / bf16 ~857 GFLOP/s on 2 threads"
TIMING_FILE = "demo_timing.json"

BROKEN_LIST = "broken-links.csv"  # bad data: the quality gate holds this batch back from the shards


def write_demo_url_lists(settings: Settings) -> list[str]:
    """The demo world's URL lists, pointing at its loopback server (idempotent), and one
    broken list (mostly dead links) that shows the data-quality gate at work."""
    from assets.resources import demo_world_for
    from dalle_core.profiles import get_profile

    out = Path(settings.url_list_dir)
    if out.is_dir() and any(out.iterdir()):
        return sorted(p.name for p in out.iterdir())
    world = demo_world_for(get_profile(settings.profile))
    base_url = f"http://127.0.0.1:{settings.demo_port}"
    paths = world.write_url_lists(out, base_url) + [world.write_broken_url_list(out, base_url, BROKEN_LIST)]
    return sorted(p.name for p in paths)


def run_demo(settings: Settings, say=print) -> dict:
    from dalle_core.machine import describe_speed, machine_speed
    from orchestration.definitions import build_definitions

    t0, started = time.monotonic(), datetime.now(timezone.utc)
    speed_before = machine_speed()  # the condition every timing below was measured under
    instance = prepare_instance(settings)
    defs = build_definitions(settings)
    resources = defs.resources
    profile = resources["profile"].get()
    say(f"[demo] profile={profile.name} run dir={settings.run_dir}")
    say(f"[demo] machine: {describe_speed(speed_before)} ({BUDGET_SET_AT})")

    lists = write_demo_url_lists(settings)
    from assets.data import crawl_batches

    new = [n for n in lists if not instance.has_dynamic_partition(crawl_batches.name, n)]
    if new:
        instance.add_dynamic_partitions(crawl_batches.name, new)
    say(f"[demo] URL lists (crawl batches): {', '.join(lists)}")

    held_back: list[str] = []
    stages: list[dict] = []

    def run(job: str, label: str, partition_key: str | None = None):
        """One job in process on the demo's instance; stop with a pointer to the UI if it fails,
        unless all that failed is a crawl batch's quality suite: that batch is held back."""
        t = time.monotonic()
        res = defs.resolve_job_def(job).execute_in_process(
            instance=instance, partition_key=partition_key, raise_on_error=False
        )
        failed_checks = [e for e in res.get_asset_check_evaluations() if not e.passed]
        gated = (not res.success and job == "filter_job" and failed_checks
                 and res.get_asset_materialization_events())  # filtered, but its blocking suite failed
        status = "ok" if res.success else "HELD BACK by its data-quality suite" if gated else "FAILED"
        seconds = time.monotonic() - t
        stages.append({"stage": label, "job": job, "seconds": round(seconds, 1), "status": status})
        say(f"[demo] {label}: {status} ({seconds:.0f}s)")
        for e in res.get_asset_check_evaluations():
            say(f"[demo]   check {e.asset_check_key.name}: {'passed' if e.passed else 'FAILED'}")
            if not e.passed and "result" in e.metadata:
                for line in e.metadata["result"].value.splitlines()[1:]:
                    if line.strip():
                        say(f"[demo]     {line.strip()}")
        if gated:
            held_back.append(partition_key)
        elif not res.success:
            raise SystemExit(f"{label} failed: see the run in the Dagster UI (make ui)")
        return res

    # one server for all batches (each raw_pairs run would otherwise start its own)
    with resources["crawl_source"].serving(profile):
        for name in lists:
            run("crawl_job", f"crawled {name}", partition_key=name)
    run("eval_set_job", "evaluation set")
    for name in lists:  # the map: one run per crawl batch, as the K8s run launcher gives each a pod
        run("filter_job", f"filtered {name}", partition_key=name)
    run("shards_job", "merged and sharded")
    say("[demo] training the BPE tokenizer and the dVAE, then encoding the shards ...")
    run("dvae_job", "tokenizer and dVAE")
    from assets.data import code_shards

    for shard in instance.get_dynamic_partitions(code_shards.name):  # registered by shards
        run("image_codes_job", f"encoded {shard}", partition_key=shard)
    say("[demo] training the transformer prior (torchrun, through Dagster Pipes) ...")
    run("prior_job", "code manifest and prior")
    say("[demo] training the contrastive reranker, then sampling the evaluation captions ...")
    run("generation_job", "reranker and samples")
    say("[demo] zero-shot evaluation on the held-out captions ...")
    run("evaluation_job", "zero-shot report")

    summary = summarize(settings, instance)
    summary["held_back"] = held_back
    if held_back:
        summary["lines"].append(f"{'held back':15s} {', '.join(held_back)} (failed data-quality suite: not in the "
                                "shards; see the filtered_pairs check in the Dagster UI)")
    total, speed_after = time.monotonic() - t0, machine_speed()
    summary["timing"] = write_timing(settings, profile.name, started, total, stages, speed_before, speed_after)
    say("")
    say(f"[demo] done in {total:.0f}s (machine at the end: {describe_speed(speed_after)}; "
        f"stage timings in {Path(settings.run_dir) / TIMING_FILE}). What it produced:")
    for line in summary["lines"]:
        say(f"  {line}")
    say("")
    say("Where to look:")
    say(f"  storage:        {settings.storage_root}")
    say(f"  samples:        {settings.storage_root}/samples/grid.png (reranked | first draws, one caption a row)")
    say(f"  report:         {settings.storage_root}/reports/zero_shot/latest.html (FID needs Inception weights: DALLE_INCEPTION_WEIGHTS)")
    say('  generate:       .venv/bin/dalle generate "a red circle above a blue square" --out grid.png')
    say(f"  MLflow:         {settings.mlflow_tracking_uri}  (experiment 'dalle')")
    say("  Dagster UI:     make ui  -> http://127.0.0.1:3000 (assets, checks, runs of this demo)")
    say("  MLflow UI:      make ui  -> http://127.0.0.1:5000")
    return summary


def write_timing(settings: Settings, profile: str, started: datetime, total: float, stages: list[dict],
                 speed_before: dict, speed_after: dict) -> dict:
    """<run dir>/demo_timing.json: each stage's wall clock with the machine's matmul rates at the
    start and the end, so that a timing is compared only with one taken on an equally fast machine."""
    import torch

    from dalle_core.io import atomic_write_text

    timing = {"profile": profile, "started": started.isoformat(timespec="seconds"), "total_seconds": round(total, 1),
              "stages": stages, "machine_before": speed_before, "machine_after": speed_after,
              "torch": torch.__version__, "budget_set_at": BUDGET_SET_AT}
    atomic_write_text(Path(settings.run_dir) / TIMING_FILE, json.dumps(timing, indent=1) + "\n")
    return timing


def summarize(settings: Settings, instance) -> dict:
    """One line per asset from its latest materialization's metadata; for a partitioned
    asset, the sum over its partitions' latest materializations."""
    lines = []
    for key, fields in [
        ("raw_pairs", ("rows", "downloaded", "failed")),
        ("coco_eval_set", ("images",)),
        ("filtered_pairs", ("input", "kept")),
        ("shards", ("samples", "shards", "cross_batch_duplicates")),
        ("bpe_tokenizer", ("trained_vocab", "mean_tokens_per_caption")),
        ("dvae", ("steps", "caption_match_reconstruction", "caption_match_original", "eval_codebook_usage", "model_version")),
        ("image_codes", ("samples",)),
        ("image_codes_manifest", ("samples", "shards", "grid")),
        ("prior", ("world_size", "image_loss", "image_unigram", "image_loss_over_unigram", "model_version")),
        ("reranker", ("steps", "retrieval_image_to_text", "swap_binding", "attribute_binding", "near_miss_pick",
                      "near_miss_loss", "model_version")),
        ("samples", ("caption_match_reranked", "caption_match_random", "caption_match_shuffled",
                     "colour_match_reranked", "colour_match_random", "colour_match_shuffled",
                     "heldout/caption_match_first_draw", "heldout/caption_match_any")),
        ("coco_zero_shot_report", ("captions", "caption_match", "colour_match", "caption_match_reference",
                                   "contrastive_fd", "contrastive_precision", "contrastive_recall", "fid",
                                   "promotion")),
    ]:
        metas = latest_metadata(instance, key, PARTITIONED.get(key))
        if not metas:
            continue
        values = ", ".join(f"{f}={summed(metas, f)}" for f in fields if f in metas[0])
        if len(metas) > 1:
            values += f" ({len(metas)} partitions)"
        lines.append(f"{key:15s} {values}")
    caption_match, diagnosis = caption_match_lines(instance)
    lines += [line for line in (caption_match, diagnosis) if line]
    return {"lines": lines, "caption_match": caption_match, "diagnosis": diagnosis}


def caption_match_lines(instance) -> tuple[str | None, str | None]:
    """("caption match    held-out: reranked .., first draw .., any-of-N ..; training captions:
    ...; reranker swap binding ..", "diagnosis        ..."), from the zero-shot report's and the
    reranker's latest metadata; (None, None) before there is a report with the figures."""
    report = latest_metadata(instance, "coco_zero_shot_report", None)
    if not report or "heldout/caption_match_reranked" not in report[0]:
        return None, None
    from dalle_core.eval.caption_match import figures_line

    m = {k: v.value for k, v in report[0].items()}
    n = m.get("candidates", "N")

    def figures(split: str) -> str:
        keys = ("caption_match_reranked", "caption_match_first_draw", "caption_match_any")
        return figures_line({k: m[f"{split}/{k}"] for k in keys}, n)

    parts = [f"held-out: {figures('heldout')}"]
    if "train/caption_match_reranked" in m:
        parts.append(f"training captions: {figures('train')}")
    reranker = latest_metadata(instance, "reranker", None)
    if reranker and "swap_binding" in reranker[0]:
        parts.append(f"reranker swap binding {reranker[0]['swap_binding'].value:.2f}"
                     + (f", near-miss pick {reranker[0]['near_miss_pick'].value:.2f}"
                        if "near_miss_pick" in reranker[0] else ""))
    return f"{'caption match':15s} {'; '.join(parts)}", f"{'diagnosis':15s} {m.get('diagnosis', 'none')}"


PARTITIONED = {"raw_pairs": "crawl_batches", "filtered_pairs": "crawl_batches", "image_codes": "code_shards"}


def latest_metadata(instance, key: str, partitions_name: str | None) -> list[dict]:
    """Metadata of the asset's latest materialization, one per current partition for a partitioned asset."""
    import dagster as dg

    asset_key = dg.AssetKey(key)
    if partitions_name is None:
        event = instance.get_latest_materialization_event(asset_key)
        return [event.asset_materialization.metadata] if event is not None else []
    partitions = instance.get_dynamic_partitions(partitions_name)
    records = (instance.fetch_materializations(dg.AssetRecordsFilter(asset_key, asset_partitions=[p]), limit=1).records
               for p in partitions)
    return [r[0].asset_materialization.metadata for r in records if r]


def summed(metas: list[dict], field: str):
    """The field's value; summed over partitions when it is a count."""
    values = [m[field].value for m in metas if field in m]
    if len(values) > 1 and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sum(values)
    return values[-1]
