"""The contrastive image-text reranker (paper section 2.6: CLIP reranks the samples).

model.py   RerankerConfig (sizes: dalle_core.profiles), ContrastiveReranker
           (image + text encoders, learnable temperature, symmetric InfoNCE;
           score / rerank / rerank_groups / image_features), save / load
train.py   train_reranker: AdamW, checkpoints, resume to the same result
"""

from .model import (
    ContrastiveReranker,
    RerankerConfig,
    load_reranker,
    save_reranker,
)
from .train import RerankTrainResult, train_reranker

__all__ = [
    "ContrastiveReranker", "RerankTrainResult", "RerankerConfig",
    "load_reranker", "save_reranker", "train_reranker",
]
