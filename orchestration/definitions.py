"""The one `Definitions` of the platform, built from per-domain modules."""

from __future__ import annotations

import dagster as dg

from assets.asset_checks import data_checks
from assets.data import coco_eval_set, filtered_pairs, raw_pairs, shards_asset
from assets.dvae import dvae, image_codes, image_codes_manifest
from assets.launchers import TorchrunLauncher
from assets.evaluation import coco_zero_shot_report
from assets.generation import reranker, samples
from assets.human_eval import human_eval_complete_sensor, human_eval_report
from assets.prior import prior
from assets.resources import CrawlSourceResource, MlflowResource, ProfileResource, StorageResource
from assets.text import bpe_tokenizer
from orchestration.jobs import ALL_JOBS
from orchestration.schedules import retrain_schedule
from orchestration.sensors import new_url_list_sensor, retrain_chain_sensor
from orchestration.settings import Settings
from dalle_core.heap import keep_freed_heap

# the code location's run processes train and sample on the CPU too: freed pages are reused
# (dalle_core/heap.py)
keep_freed_heap()


def build_resources(settings: Settings) -> dict:
    return {
        "storage": StorageResource(
            root=settings.storage_root,
            endpoint_url=settings.s3_endpoint_url,
            scratch_dir=str(settings.run_dir / "scratch"),
        ),
        "profile": ProfileResource(name=settings.profile),
        "mlflow": MlflowResource.from_settings(settings),
        # where torchrun trainings (prior, data-parallel dVAE) run: local (the demo) | slurm | k8s
        # (DALLE_TORCHRUN_BACKEND)
        "torchrun": TorchrunLauncher.from_env(),
        "crawl_source": CrawlSourceResource(
            url_list_dir=settings.url_list_dir,
            demo_world=settings.demo_world,
            demo_port=settings.demo_port,
        ),
    }


def build_definitions(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=[raw_pairs, coco_eval_set, filtered_pairs, shards_asset, bpe_tokenizer, dvae, image_codes,
                image_codes_manifest, prior, reranker, samples, coco_zero_shot_report, human_eval_report],
        asset_checks=data_checks,
        jobs=ALL_JOBS,
        schedules=[retrain_schedule],
        sensors=[new_url_list_sensor, retrain_chain_sensor, human_eval_complete_sensor],
        resources=build_resources(settings),
    )


defs = build_definitions(Settings.from_env())
