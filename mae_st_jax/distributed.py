"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or a detected cluster (Slurm,
Cloud TPU pod slice, Open MPI), nothing for one process. Call `initialize` before anything touches devices."""

import dataclasses
import itertools
import os
from typing import Mapping

import jax
from absl import logging


_barrier_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do: mode 'explicit' | 'slurm' | 'tpu' | 'ompi' | 'single', and why."""
    mode: str
    reason: str
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    @property
    def distributed(self) -> bool:
        return self.mode != "single"


def _int(environ: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        return default


def _hosts(value: str) -> int:
    return len([h for h in value.split(",") if h.strip()])


def decide(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
           environ: Mapping[str, str] | None = None, tpu_vm_process_count: int = 0) -> Plan:
    """The start-up mode from the flags and the environment; pure (initialises nothing).

    Explicit flags need all three of coordinator_address, num_processes and process_id. Without
    flags, a cluster is used only where JAX's own detection will find its parameters and there is
    more than one process: a Slurm step with SLURM_NTASKS > 1, a Cloud TPU pod slice with several
    hosts (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES / MEGASCALE_* in the environment, or
    `tpu_vm_process_count` > 1 found from a TPU VM's metadata), an Open MPI job of more than one rank.
    Under Slurm JAX gives each task only the GPU numbered SLURM_LOCALID: launch one task per GPU.
    """
    environ = os.environ if environ is None else environ
    given = {"--coordinator_address": bool(coordinator_address), "--num_processes": num_processes > 0,
             "--process_id": process_id >= 0}
    if any(given.values()):
        missing = [name for name, ok in given.items() if not ok]
        if missing:
            raise ValueError(f"multi-host start needs all of --coordinator_address, --num_processes and "
                             f"--process_id; missing {', '.join(missing)} (or give none to auto-detect)")
        if process_id >= num_processes:
            raise ValueError(f"--process_id={process_id} must be smaller than --num_processes={num_processes}")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator_address={coordinator_address!r} needs a port, e.g. 10.0.0.1:1234")
        return Plan("explicit", f"flags: process {process_id} of {num_processes}, coordinator {coordinator_address}",
                    coordinator_address, num_processes, process_id)

    if "SLURM_JOB_ID" in environ:
        ntasks = _int(environ, "SLURM_NTASKS", _int(environ, "SLURM_NPROCS", 1))
        if ntasks > 1:
            if all(k in environ for k in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")):
                return Plan("slurm", f"Slurm job {environ['SLURM_JOB_ID']}: task {environ['SLURM_PROCID']} "
                                     f"of {ntasks}")
            return Plan("single", f"Slurm job {environ['SLURM_JOB_ID']} has {ntasks} tasks but this is not an "
                                  f"srun step (no SLURM_STEP_NODELIST/SLURM_PROCID): one process")

    tpu_hosts = _hosts(environ.get("TPU_PROCESS_ADDRESSES", environ.get("TPU_WORKER_HOSTNAMES", "")))
    slices = _int(environ, "MEGASCALE_NUM_SLICES", 1)
    hosts = tpu_vm_process_count if tpu_vm_process_count > 1 else max(tpu_hosts, 1) * max(slices, 1)
    if hosts > 1:
        return Plan("tpu", f"Cloud TPU pod slice: {hosts} hosts (TPU_WORKER_ID {environ.get('TPU_WORKER_ID', '?')})")

    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return Plan("ompi", f"Open MPI: rank {environ.get('OMPI_COMM_WORLD_RANK', '?')} of "
                            f"{environ['OMPI_COMM_WORLD_SIZE']}")
    return Plan("single", "no --coordinator_address and no multi-process cluster detected: one process")


def _tpu_vm_process_count() -> int:
    """Hosts in this Cloud TPU VM's slice from GCE metadata, via JAX's own TPU cluster detection; 0 when
    not on a TPU VM (checked without touching devices) or when the metadata cannot be read."""
    try:
        from jax._src import cloud_tpu_init
        if not cloud_tpu_init.running_in_cloud_tpu_vm or os.environ.get("TPU_SKIP_MDS_QUERY") is not None:
            return 0
        from jax._src.clusters import cloud_tpu_cluster
        env = cloud_tpu_cluster.GceTpuCluster
        return env.get_process_count() if env.is_env_present() else 0
    except Exception as e:  # private JAX API or no metadata server: fall back to the environment
        logging.warning("Could not read the TPU slice's host count from metadata (%s: %s)", type(e).__name__, e)
        return 0


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> Plan:
    """Start JAX's distributed runtime as `decide` says (idempotent); returns the plan it followed."""
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised: process %d of %d", jax.process_index(),
                     jax.process_count())
        return Plan("already", "jax.distributed was already initialised")
    explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    plan = decide(coordinator_address, num_processes, process_id)
    if not explicit and not plan.distributed:
        tpu_count = _tpu_vm_process_count()
        if tpu_count > 1:
            plan = decide(tpu_vm_process_count=tpu_count)
    if not plan.distributed:
        logging.info("Distributed: %s", plan.reason)
        return plan
    logging.info("Distributed: initialising jax.distributed (%s)", plan.reason)
    if plan.mode == "explicit":
        jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id)
    elif plan.mode in ("slurm", "ompi"):  # JAX reads the cluster's variables (Slurm: one GPU per task)
        jax.distributed.initialize(cluster_detection_method=plan.mode)
    else:  # TPU: JAX's GKE or GCE detection, whichever applies
        jax.distributed.initialize()
    logging.info("Distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return plan


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches this point (nothing for one process). It goes through the
    coordination service, not a device collective: a host that compiled for much longer cannot trip a
    collective's set-up timeout (gloo on CPU gives up after 30 s)."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost
    key = f"mae_st_jax/{name.replace(' ', '_')}/{next(_barrier_ids)}"  # barrier names must not repeat
    multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


def _jax_global_state():
    """jax.distributed's process-wide state (its coordination-service client, preemption manager).
    JAX has no public handle for these: this is the one place that reaches into jax._src for them."""
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state


def preemption_service_running() -> bool:
    """True when JAX's preemption service runs (several processes): its own SIGTERM handler tells the
    coordinator, and mgr.reached_preemption(step) then turns True at the same step on every process."""
    if jax.process_count() == 1:
        return False
    try:
        return _jax_global_state().preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def gather(name: str, value: str, timeout_s: int = 3600) -> list[str]:
    """Every process's `value`, by process index ([value] for one process), through the coordination
    service's key-value store (no device collective: it works before anything compiled)."""
    if jax.process_count() == 1:
        return [value]
    global _last_gathered
    client = _jax_global_state().client
    key = f"mae_st_jax/{name.replace(' ', '_')}/{next(_barrier_ids)}"
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    client.wait_at_barrier(key.replace("/", "_"), timeout_in_ms=timeout_s * 1000)
    if _last_gathered is not None:  # past this barrier every process has read the previous gather's values
        try:
            client.key_value_delete(_last_gathered)  # the store would grow by one entry per process per call
        except Exception:
            pass
    values = dict(client.key_value_dir_get(f"{key}/"))
    _last_gathered = f"{key}/{jax.process_index()}"
    return [values[f"{key}/{i}"] for i in range(jax.process_count())]


_last_gathered: str | None = None  # this process's key of its previous gather


def differing(name: str, value: str) -> list[str] | None:
    """None when every process gives the same `value`, else every process's value by process index
    (by_process lists them): how the processes check that they see the same config, files or steps."""
    values = gather(name, value)
    return values if len(set(values)) > 1 else None


def by_process(values: list[str], empty: str = "nothing") -> str:
    """'process 0: A; process 1: B' (`empty` for an empty value)."""
    return "; ".join(f"process {i}: {v or empty}" for i, v in enumerate(values))


def sum_over_processes(name: str, *counts: int) -> tuple[int, ...]:
    """The sums over every process of these per-process integer counts (the counts for one process)."""
    rows = [[int(x) for x in v.split(",")] for v in gather(name, ",".join(str(int(c)) for c in counts))]
    return tuple(sum(column) for column in zip(*rows))


def exit_barrier(timeout_s: float) -> bool:
    """Wait (at most timeout_s) until every process is about to exit; True when all came. Used once,
    by a process that is ending on an error: those that stop together leave together, one that
    failed alone stops waiting. The barrier's name is fixed, not numbered like `barrier`'s: processes
    that fail at different points have passed different numbers of barriers and must still meet."""
    if jax.process_count() == 1:
        return True
    try:
        _jax_global_state().client.wait_at_barrier("mae_st_jax_exit", timeout_in_ms=int(timeout_s * 1000))
        return True
    except Exception:
        return False


def first_error(name: str, error: BaseException | None) -> str | None:
    """Every process learns whether one failed at the same point: None when none did, else the first
    failing process's message (prefixed `process K: ` on the others). A process that stops on its own
    error alone would leave the others waiting for it at the next barrier or collective."""
    values = gather(name, " ".join(str(error).split()) or type(error).__name__ if error is not None else "")
    failed = [(i, v) for i, v in enumerate(values) if v]
    if not failed:
        return None
    i, message = failed[0]
    return message if i == jax.process_index() else f"process {i}: {message}"


def define_flags() -> None:
    """--coordinator_address / --num_processes / --process_id, for the CLIs that call initialize()."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", "", "Multi-host: process 0's host:port (with --num_processes and "
                        "--process_id); empty: auto-detect Slurm / Cloud TPU pod / Open MPI, else one process.")
    flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index in [0, num_processes).")
