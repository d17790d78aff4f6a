"""Command-line entry: `python -m mae_st_jax.main --config=configs/demo.py --workdir=DIR` runs config.mode."""

import logging as pylogging
import hashlib
import os
import sys
import time

if __name__ == "__main__":  # before JAX starts; on CPU-only hosts this may re-execute the command once
    from mae_st_jax import host_malloc
    host_malloc.reexec()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mae_st_jax import config_lib, distributed  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:vit_l,k400.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and figures.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drop INFO chatter from Orbax and friends; warnings and errors still pass."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or not any(
            name in record.pathname for name in ("/orbax/", "/clu/parameter_overview"))


_processes = 1  # jax.process_count(), once jax.distributed is up


def _exit(message: str) -> None:
    """sys.exit(message); in a multi-process run the process ends at once instead (os._exit, after the
    message and the logs are out). A Python exit waits for the data loader's threads and in
    jax.distributed's shutdown barrier for the other processes, which may be waiting in a step for
    this one: when one process failed alone the job hung until that barrier timed out (300 s). Now
    the processes that stop together (an error they all see) meet at an exit barrier and process 0,
    whose exit takes the coordination service down (and aborts whoever is still connected), leaves
    last; a process that failed alone waits there at most _EXIT_WAIT_S, and the others are then
    ended by JAX when they miss its heartbeats (~100 s), or at once when it was process 0."""
    if _processes == 1:
        sys.exit(message)
    together = distributed.exit_barrier(_EXIT_WAIT_S)
    logging.set_verbosity(logging.ERROR)  # the loader's threads may still be reading: the line stays last
    print(message, file=sys.stderr, flush=True)
    logging.flush()
    sys.stdout.flush()
    if together and jax.process_index() == 0:
        time.sleep(2)  # the others leave first
    os._exit(1)


_EXIT_WAIT_S = 20


def main(argv):
    del argv
    try:
        _main()
    except SystemExit:
        raise
    except BaseException as e:  # not one of ours: the traceback, then (several processes) end at once
        if _processes == 1:
            raise
        logging.exception("process %d failed", jax.process_index())
        _exit(f"error: {type(e).__name__}: {' '.join(str(e).split())[:2000]}")


def _main():
    try:  # before anything touches devices
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        sys.exit(f"flag error: {e}")
    global _processes
    _processes = jax.process_count()
    for handler in pylogging.getLogger().handlers + [logging.get_absl_handler()]:
        handler.addFilter(_QuietLibraries())
    config = FLAGS.config
    logging.info("JAX %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    digest = hashlib.sha256(f"{config.to_json_best_effort(sort_keys=True)} {FLAGS.workdir}".encode()).hexdigest()
    digests = distributed.differing("config", digest)
    if digests is not None:
        differ = [i for i, d in enumerate(digests) if d != digests[0]]
        _exit(f"flag error: process {differ[0]} was given another config or workdir than process 0 (processes "
                 f"{differ} differ): every process must run the same command")
    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    except config_lib.ConfigError as e:
        _exit(f"config error: {e}")
    from mae_st_jax.train import loop
    try:
        if config.mode == "pretrain":
            from mae_st_jax.train import pretrain
            pretrain.train(config, FLAGS.workdir)
        elif config.mode == "finetune":
            from mae_st_jax.train import finetune
            finetune.train(config, FLAGS.workdir)
    except loop.RestoreError as e:
        _exit(f"resume: {e}")
    except loop.USER_ERRORS as e:  # one line: what went wrong and what to do (the log above has the details)
        _exit(f"error: {e}")
    if config.mode == "evaluate":
        from mae_st_jax import evaluate
        try:
            evaluate.run(config, FLAGS.workdir)
        except (ValueError, FileNotFoundError) as e:
            _exit(f"evaluate: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
