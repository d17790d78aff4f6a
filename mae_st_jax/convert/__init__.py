"""Converters between PyTorch MAE-ST checkpoints (mae_st, PySlowFast) and mae_st_jax parameters."""

__all__ = ["infer_model_config", "load_into_model", "load_torch_state_dict", "params_to_torch",
           "torch_to_params"]


def __getattr__(name):  # lazy, so `python -m mae_st_jax.convert.from_torch` imports the module once
    if name in __all__:
        from mae_st_jax.convert import from_torch  # noqa: PLC0415
        return getattr(from_torch, name)
    raise AttributeError(name)
