"""The text side: a lowercased BPE tokenizer trained on the shards' captions."""


import hashlib

import dagster as dg

from assets.data import SHARDS, require_passing_shards, shards_asset
from assets.metadata import md, md_table
from assets.resources import MlflowResource, ProfileResource, StorageResource, data_version
from dalle_core.data import shards
from dalle_core.text.bpe import train_bpe_tokenizer

TOKENIZER_KEY = "tokenizer/bpe.json"


def tokenizer_sha256(store) -> str:
    """sha256 of the stored tokenizer: what the codes and the models that read captions were made with."""
    return hashlib.sha256(store.get_text(TOKENIZER_KEY).encode()).hexdigest()


@dg.asset(
    deps=[shards_asset],
    group_name="text",
    kinds={"python"},
    description="Lowercased BPE (tokenizers) over the captions, with one padding token per text position.",
)
def bpe_tokenizer(
    context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    require_passing_shards(store)
    captions = [p.caption for p in shards.read_shards(store, SHARDS)]
    tok = train_bpe_tokenizer(captions, prof.text)
    store.put_text(TOKENIZER_KEY, tok.to_json())

    infos = [tok.encode_with_info(c) for c in captions]
    truncated = sum(i.truncated for i in infos) / len(infos)
    mean_tokens = sum(i.n_tokens_full for i in infos) / len(infos)
    examples = [(c, " ".join(tok.backend.id_to_token(t) for t in i.ids[: i.n_tokens])) for c, i in zip(captions[:5], infos)]
    with mlflow.start_run("bpe_tokenizer", tags={"stage": "text", "profile": prof.name}, data_version=data_version(store)) as run:
        mlflow.log_params(prof.text.to_dict())
        mlflow.log_metrics({"trained_vocab": tok.trained_vocab_size, "mean_tokens": mean_tokens, "truncated_fraction": truncated})
        mlflow.log_text(tok.to_json(), "bpe.json")
        run_url = mlflow.run_url(run)
    context.log.info(f"tokenizer: {tok.trained_vocab_size} tokens from {len(captions)} captions")
    return dg.MaterializeResult(
        metadata={
            "captions": len(captions),
            "vocab_size": prof.text.vocab_size,
            "trained_vocab": tok.trained_vocab_size,
            "text_len": prof.text.text_len,
            "mean_tokens_per_caption": round(mean_tokens, 2),
            "truncated_fraction": round(truncated, 4),
            "examples": md(md_table(["caption", "tokens"], examples)),
            "location": dg.MetadataValue.path(store.uri(TOKENIZER_KEY)),
            "mlflow_run": dg.MetadataValue.url(run_url),
        }
    )
