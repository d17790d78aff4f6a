"""Flax NNX models: the MAE-ST autoencoder (pre-training) and its building blocks."""

from mae_st_jax.models.mae import MaskedAutoencoder, SIZES, model_kwargs

__all__ = ["MaskedAutoencoder", "SIZES", "model_kwargs"]
from mae_st_jax.models.classifier import VideoClassifier
__all__ += ["VideoClassifier"]
