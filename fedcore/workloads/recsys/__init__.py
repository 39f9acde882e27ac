"""Recommendation workloads on real data: MovieLens-100K (video platform) and clothing reviews (e-commerce).

Data splits, partitions, models, losses and metrics; the federation itself is elsewhere in
:mod:`fedcore`. Every builder returns the federated clients and the centralized twin on the same
split, so every federated figure stands beside a centralized one computed by the same code.
"""

from ._clothing import (
    ClothingConfig,
    ClothingFederation,
    ClothingTask,
    EmbeddedReviews,
    LoraClassifier,
    MiniLMClassifier,
    TokenizedReviews,
    clothing_federation,
    clothing_split,
    clothing_texts,
)
from ._lora import (
    LORA_TARGETS,
    HiddenStates,
    LoraEncoderTop,
    LoraSpec,
    cached_hidden_states,
    load_adapters,
    minilm_identity,
    save_adapters,
)
from ._models import MatrixFactorization, SequenceRecommender
from ._movielens import (
    CandidateDataset,
    InteractionDataset,
    MovieLensFederation,
    MovieLensTask,
    RecommenderConfig,
    UserExamples,
    movielens_federation,
    movielens_item_features,
    movielens_item_texts,
    zip_regions,
)
from ._protocol import (
    PROTOCOL,
    LeaveOneOut,
    hit_rate_ndcg,
    leave_one_out,
    per_user_hit_ndcg,
    popularity_scores,
    rank_of_positive,
)
from ._text import EMBEDDING_DIM, cached_text_embeddings, encode_texts, load_minilm, mean_pool, minilm_path

__all__ = [
    "PROTOCOL",
    "EMBEDDING_DIM",
    "LeaveOneOut",
    "leave_one_out",
    "hit_rate_ndcg",
    "per_user_hit_ndcg",
    "rank_of_positive",
    "popularity_scores",
    "RecommenderConfig",
    "InteractionDataset",
    "UserExamples",
    "CandidateDataset",
    "MovieLensTask",
    "MovieLensFederation",
    "MatrixFactorization",
    "SequenceRecommender",
    "movielens_federation",
    "movielens_item_features",
    "movielens_item_texts",
    "zip_regions",
    "ClothingConfig",
    "ClothingTask",
    "ClothingFederation",
    "MiniLMClassifier",
    "LoraClassifier",
    "LoraSpec",
    "LoraEncoderTop",
    "LORA_TARGETS",
    "HiddenStates",
    "cached_hidden_states",
    "minilm_identity",
    "save_adapters",
    "load_adapters",
    "TokenizedReviews",
    "EmbeddedReviews",
    "clothing_federation",
    "clothing_split",
    "clothing_texts",
    "minilm_path",
    "load_minilm",
    "encode_texts",
    "cached_text_embeddings",
    "mean_pool",
]
