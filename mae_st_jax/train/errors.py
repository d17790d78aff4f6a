"""The errors a user can cause and fix (a workdir, a checkpoint, config.init_from, the data, a diverged
run): main.py prints each as one line and exits 1. One module that loop.py and checkpoint.py both import."""

from mae_st_jax.data.errors import DataError


class RestoreError(RuntimeError):
    """A workdir holds checkpoints, but none of them fits this run's train state."""


class WorkdirError(OSError):
    """The workdir cannot be written or cannot hold the run's checkpoints."""


class StepsDifferError(WorkdirError, ValueError):
    """The processes of one run list different checkpoint steps: their workdir (or config.init_from) is not
    one shared folder. Also a ValueError: what reads a checkpoint's folder (evaluate, features) reports those."""


class DataSourceError(DataError, ValueError):
    """config.data names data this process cannot train on (no files, too few for the processes, labels)."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient (the state is not saved)."""


class InitFromError(ValueError):
    """config.init_from cannot be read or does not fit the model."""


# what a user can cause and fix: main.py prints these as one line (exit 1) instead of a traceback
USER_ERRORS = (RestoreError, WorkdirError, DataError, NonFiniteError, InitFromError)
