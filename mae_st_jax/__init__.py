"""mae_st_jax: Masked Autoencoders As Spatiotemporal Learners (MAE-ST) in JAX/Flax NNX."""

__version__ = "0.1.0"
