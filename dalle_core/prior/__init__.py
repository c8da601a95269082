"""The transformer prior (paper section 2.2, appendix B): one decoder-only
transformer over 256 text + 1024 image tokens with row / column / convolutional
attention masks, trained with 1/8 text + 7/8 image cross-entropy.

config.py   PriorConfig (the model), PriorTrainingConfig (how it is trained), SamplingConfig
            (how the platform samples it), count_parameters;
            the sizes are the profiles' (dalle_core.profiles)
masks.py    the attention masks and the paper's layer pattern
model.py    DalleTransformer (blocks of AttentionResblock + MLPResblock), KVCache, optimizer groups,
            the model file (save_prior / load_prior, shape pinned inside)
"""

from .config import (
    ATTENTION_KINDS,
    SHAPE_FIELDS,
    PriorConfig,
    PriorTrainingConfig,
    SamplingConfig,
    count_parameters,
)
from .masks import (
    attention_mask,
    build_attention_mask,
    column_attention_mask,
    column_image_mask,
    conv_image_mask,
    convolutional_attention_mask,
    format_mask,
    layer_attention_kind,
    row_attention_mask,
    row_image_mask,
    text_causal_mask,
)
from .model import (
    MLP,
    AttentionResblock,
    Block,
    DalleTransformer,
    FP32LayerNorm,
    KVCache,
    MLPResblock,
    SelfAttention,
    build_optimizer,
    load_prior,
    optimizer_param_groups,
    read_prior_file,
    save_prior,
)

__all__ = [
    "ATTENTION_KINDS", "SHAPE_FIELDS", "PriorConfig", "PriorTrainingConfig", "SamplingConfig", "count_parameters",
    "attention_mask", "build_attention_mask", "column_attention_mask", "column_image_mask",
    "conv_image_mask", "convolutional_attention_mask", "format_mask", "layer_attention_kind",
    "row_attention_mask", "row_image_mask", "text_causal_mask",
    "MLP", "AttentionResblock", "Block", "DalleTransformer", "FP32LayerNorm", "KVCache", "MLPResblock",
    "SelfAttention", "build_optimizer", "optimizer_param_groups", "save_prior", "load_prior", "read_prior_file",
]
