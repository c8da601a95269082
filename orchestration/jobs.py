"""Jobs: the crawl of one batch (a partition), and the data stage after it."""

import dagster as dg

from orchestration.hooks import notify_on_failure

HOOKS = {notify_on_failure}  # every job reports its failures

crawl_job = dg.define_asset_job(
    "crawl_job",
    selection=dg.AssetSelection.assets("raw_pairs"),
    hooks=HOOKS,
    description="Crawl one URL list (a crawl_batches partition).",
)

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.assets("coco_eval_set", "filtered_pairs", "shards"),
    hooks=HOOKS,
    description="Evaluation set, filters and shards over every completed crawl batch, with their checks.",
)

dvae_job = dg.define_asset_job(
    "dvae_job",
    selection=dg.AssetSelection.assets("bpe_tokenizer", "dvae", "image_codes"),
    hooks=HOOKS,
    description="Stage one: the BPE tokenizer, the dVAE and the image codes the prior reads.",
)

prior_job = dg.define_asset_job(
    "prior_job",
    selection=dg.AssetSelection.assets("prior"),
    hooks=HOOKS,
    description="Stage two: the transformer prior, trained with torchrun through Dagster Pipes.",
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

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets("bpe_tokenizer", "dvae", "image_codes", "prior", "reranker", "samples",
                                       "coco_zero_shot_report"),
    hooks=HOOKS,
    description="Periodic retraining on the current shards: tokenizer, dVAE, codes, prior, reranker, samples "
    "and the zero-shot report (which promotes the new prior only if it beats the champion).",
)
