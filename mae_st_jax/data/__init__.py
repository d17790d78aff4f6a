"""Data loading, clip sampling and video sources for MAE-ST."""
