"""The E6Score model: pure JAX/Flax/Optax, with no knowledge of Dagster."""

from e6score_dagster.model.compile_cache import use_compilation_cache
from e6score_dagster.model.config import ModelConfig
from e6score_dagster.model.data import FeatureLayout, ParquetBatches
from e6score_dagster.model.params import load_params, save_params
from e6score_dagster.model.score import score_batches
from e6score_dagster.model.train import TrainResult, evaluate, predict, train

__all__ = [
    "FeatureLayout",
    "ModelConfig",
    "ParquetBatches",
    "TrainResult",
    "evaluate",
    "load_params",
    "predict",
    "save_params",
    "score_batches",
    "train",
    "use_compilation_cache",
]
