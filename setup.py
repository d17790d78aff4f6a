"""mae_st_jax: Masked Autoencoders As Spatiotemporal Learners in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mae_st_jax",
    version="0.1.0",
    description="MAE-ST (video masked autoencoders) in JAX/Flax NNX for TPU and GPU",
    packages=find_packages(include=["mae_st_jax", "mae_st_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex",
        "numpy",
        "ml-collections",
        "absl-py",
        "etils[epath]",
        "clu",
        "tensorflow-cpu",  # clu.metric_writers needs tensorflow and tensorboard
        "tensorboard",
        "pillow",
        "av",
        "opencv-python-headless>=4.10",  # JPEG decode and bilinear resize in the input pipeline
        "tensorflow-datasets",  # config.data.source='tfds'
        "google-crc32c",  # the data checksum of every TFRecord record read (C, ~4 GB/s)
    ],
    extras_require={
        "convert": ["torch==2.13.0"],
        "notebooks": ["matplotlib", "nbclient", "nbformat", "ipykernel"],
        "test": ["pytest", "torch==2.13.0", "matplotlib", "nbclient", "nbformat", "ipykernel"],
    },
)
