"""Jobs. A job runs one partition (or none), so the partitioned steps have their own:
crawl_job and filter_job run one crawl batch each, image_codes_job one training shard
each; with the Kubernetes run launcher every such run is a pod of its own."""

import dagster as dg

from orchestration.hooks import notify_on_failure

HOOKS = {notify_on_failure}  # every job reports its failures

crawl_job = dg.define_asset_job(
    "crawl_job",
    selection=dg.AssetSelection.assets("raw_pairs"),
    hooks=HOOKS,
    description="Crawl one URL list (a crawl_batches partition).",
)

eval_set_job = dg.define_asset_job(
    "eval_set_job",
    selection=dg.AssetSelection.assets("coco_eval_set"),
    hooks=HOOKS,
    description="The zero-shot evaluation set and the pHashes the filters keep out of training.",
)

filter_job = dg.define_asset_job(
    "filter_job",
    selection=dg.AssetSelection.assets("filtered_pairs"),
    hooks=HOOKS,
    description="The paper's filters over one crawl batch (a crawl_batches partition), with its checks.",
)

shards_job = dg.define_asset_job(
    "shards_job",
    selection=dg.AssetSelection.assets("shards"),
    hooks=HOOKS,
    description="Every filtered batch merged (duplicates across batches removed) into shuffled training shards, "
    "with their checks; registers one code_shards partition per shard.",
)

dvae_job = dg.define_asset_job(
    "dvae_job",
    selection=dg.AssetSelection.assets("bpe_tokenizer", "dvae"),
    hooks=HOOKS,
    description="Stage one: the BPE tokenizer and the dVAE.",
)

image_codes_job = dg.define_asset_job(
    "image_codes_job",
    selection=dg.AssetSelection.assets("image_codes"),
    hooks=HOOKS,
    description="Encode one training shard (a code_shards partition) with the champion dVAE.",
)

prior_job = dg.define_asset_job(
    "prior_job",
    selection=dg.AssetSelection.assets("image_codes_manifest", "prior"),
    hooks=HOOKS,
    description="Stage two: the image-code manifest (every shard coded by the champion dVAE), then the "
    "transformer prior, trained with torchrun through Dagster Pipes.",
)

generation_job = dg.define_asset_job(
    "generation_job",
    selection=dg.AssetSelection.assets("reranker", "samples"),
    hooks=HOOKS,
    description="Generation: the contrastive reranker, and reranked samples for the evaluation captions.",
)

evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets("coco_zero_shot_report"),
    hooks=HOOKS,
    description="Zero-shot evaluation on the evaluation captions: FID / IS (with Inception weights), "
    "contrastive FD and precision / recall, caption match; the HTML report in MLflow.",
)

# The weekly retrain spans the code_shards fan-out, which no single run can hold. It is
# chained by `retrain_chain_sensor` on the runs' status: retrain_job (the unpartitioned
# head) -> image_codes_job for every shard (a run each) -> retrain_tail_job once all of
# them succeeded. Sensors rather than eager automation conditions downstream, so that a
# new crawl batch (new shards) never starts training on its own: only a retrain does.
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets("bpe_tokenizer", "dvae"),
    hooks=HOOKS,
    description="Weekly retraining on the current shards, first step: tokenizer and dVAE; then every shard is "
    "re-encoded (image_codes_job) and retrain_tail_job trains the prior, reranker, samples and zero-shot report "
    "(which promotes the new prior only if it beats the champion).",
)

retrain_tail_job = dg.define_asset_job(
    "retrain_tail_job",
    selection=dg.AssetSelection.assets("image_codes_manifest", "prior", "reranker", "samples",
                                       "coco_zero_shot_report"),
    hooks=HOOKS,
    description="Weekly retraining, last step (after every shard is re-encoded): code manifest, prior, reranker, "
    "samples and the zero-shot report.",
)

ALL_JOBS = [crawl_job, eval_set_job, filter_job, shards_job, dvae_job, image_codes_job, prior_job, generation_job,
            evaluation_job, retrain_job, retrain_tail_job]
