"""Several processes (hosts) as one run: which launcher started them, ``jax.distributed.initialize()`` with
timeouts, the checks every process makes at start, and the message when a process is lost.

Launchers, in the order they are detected (the first that matches wins; the order and the variables are those of
JAX's own cluster detection, ``jax/_src/clusters``, so what is detected here is what ``jax.distributed.initialize()``
then finds; where JAX cannot find something, it is passed explicitly):

1. ``jax``: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (any launcher; also xpk's GPU
   JobSets: ``NNODES`` + ``NODE_RANK``), passed explicitly.
2. ``openmpi``: ``mpirun`` / ``mpiexec`` of Open MPI 4 (``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_*``). Open MPI 5
   (no ``OMPI_MCA_orte_hnp_uri``, which JAX needs) works with ``JAX_COORDINATOR_ADDRESS`` set.
3. ``slurm``: ``srun`` (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
   ``SLURM_LOCALID``). A command run by ``sbatch`` without ``srun`` is refused (it would train on one node).
4. ``tpu-gke``: a TPU slice on GKE (a JobSet, what ``xpk`` starts): ``TPU_WORKER_HOSTNAMES`` (or
   ``TPU_PROCESS_ADDRESSES``), ``TPU_WORKER_ID``; multi-slice: ``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID``,
   ``MEGASCALE_COORDINATOR_ADDRESS``.
5. ``tpu-vm``: a Cloud TPU VM slice (``gcloud compute tpus tpu-vm ssh --worker=all``): the workers come from the
   VM's metadata server (``worker-network-endpoints``, ``agent-worker-number``), as JAX reads them.

With one process per host on GPUs (``srun --ntasks-per-node=1``, ``mpirun -npernode 1``) every GPU of the host
stays visible (JAX's default there is one GPU per process). ``mesh.init_timeout_s`` bounds the wait for the
coordinator; ``mesh.heartbeat_timeout_s`` is how long a silent process counts as alive.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from dreamomni2_jax.cli import UserError

TPU_PORT = "8482"  # JAX's coordinator port on Cloud TPU (jax/_src/clusters/cloud_tpu_cluster.py)
MARKER = ".hosts_check"  # written by process 0 in train.run_dir, read by every other process
INIT_MARGIN_S = 30  # JAX's own connect timeout: mesh.init_timeout_s + this
MARKER_WAIT_S = 10  # how long the other processes look for the marker (storage caches)
PER_HOST_KEYS = frozenset({"train.run_dir"})  # may differ per host (mount points); the marker checks it instead


class LaunchError(UserError):
    """The processes cannot form one run (launcher set-up, coordinator, config or storage differ)."""


@dataclass(frozen=True)
class Launch:
    """A detected multi-process launch. ``explicit``: pass coordinator / count / id to JAX (it cannot find them
    itself, or would pin one GPU per process); otherwise JAX's own detection finds the same values."""
    launcher: str
    process_id: int | None
    num_processes: int | None
    coordinator: str | None  # host:port (None: JAX reads it from the TPU metadata server)
    explicit: bool = False

    def describe(self) -> str:
        who = "" if self.process_id is None else f"process {self.process_id} of {self.num_processes}, "
        return f"{self.launcher} launch ({who}coordinator {self.coordinator or 'from the TPU metadata server'})"

    def kwargs(self) -> dict:
        if not self.explicit:
            return {}
        return {"coordinator_address": self.coordinator, "num_processes": self.num_processes,
                "process_id": self.process_id, "cluster_detection_method": "deactivate"}


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _coordinator(env: Mapping[str, str], host: str, port: str) -> str:
    """``JAX_COORDINATOR_ADDRESS`` wins (as in JAX); ``JAX_COORDINATOR_PORT`` replaces the launcher's port."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return env["JAX_COORDINATOR_ADDRESS"]
    return f"{host}:{env.get('JAX_COORDINATOR_PORT') or port}"


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[001-004,007],gpu2`` -> ``node001``), as JAX picks it."""
    m = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def _local_size(text: str | None) -> int | None:
    """Tasks on this node from ``SLURM_STEP_TASKS_PER_NODE`` (``8(x2)`` / ``8,4``; the first group)."""
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else None


def _explicit(env) -> Launch | None:
    count = _int(env, "JAX_NUM_PROCESSES")
    pid = _int(env, "JAX_PROCESS_ID")
    if count is None and env.get("NNODES") and env.get("NODE_RANK") and env.get("JAX_COORDINATOR_ADDRESS"):
        count, pid = _int(env, "NNODES"), _int(env, "NODE_RANK")  # xpk GPU JobSet: one process per node
    if count is None or count <= 1:
        return None
    if pid is None or not env.get("JAX_COORDINATOR_ADDRESS"):
        raise LaunchError(f"JAX_NUM_PROCESSES={count} needs JAX_PROCESS_ID (0..{count - 1}) and "
                          "JAX_COORDINATOR_ADDRESS (host:port of process 0) on every process")
    coord = env["JAX_COORDINATOR_ADDRESS"]
    if ":" not in coord and env.get("JAX_COORDINATOR_PORT"):
        coord = f"{coord}:{env['JAX_COORDINATOR_PORT']}"
    return Launch("jax", pid, count, coord, explicit=True)


def _openmpi(env) -> Launch | None:
    count = _int(env, "OMPI_COMM_WORLD_SIZE", 1)
    if "OMPI_COMM_WORLD_RANK" not in env or count <= 1:
        return None
    pid, local = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    uri = env.get("OMPI_MCA_orte_hnp_uri")
    if uri is None:  # Open MPI 5 (PRRTE): JAX's OmpiCluster does not see it
        if not env.get("JAX_COORDINATOR_ADDRESS"):
            raise LaunchError(f"Open MPI launch of {count} processes without OMPI_MCA_orte_hnp_uri (Open MPI 5): "
                              "set JAX_COORDINATOR_ADDRESS=<first host>:<free port> for every process "
                              "(mpirun -x JAX_COORDINATOR_ADDRESS=...)")
        return Launch("openmpi", pid, count, env["JAX_COORDINATOR_ADDRESS"], explicit=True)
    m = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    if m is None:
        raise LaunchError(f"OMPI_MCA_orte_hnp_uri={uri!r}: no launcher address in it; set JAX_COORDINATOR_ADDRESS")
    job = int(uri.split(".", 1)[0]) // 2 ** 12 if uri.split(".", 1)[0].isdigit() else 0
    coord = _coordinator(env, next(g for g in m.groups() if g), str(job % 2 ** 12 + 65535 - 2 ** 12 + 1))
    return Launch("openmpi", pid, count, coord, explicit=local == 1)


def _slurm(env) -> Launch | None:
    if not env.get("SLURM_JOB_ID"):
        return None
    count = _int(env, "SLURM_NTASKS", None) or _int(env, "SLURM_NPROCS", 1)
    if count <= 1:
        return None
    missing = [v for v in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID") if v not in env]
    if missing:
        raise LaunchError(f"SLURM job {env['SLURM_JOB_ID']} with {count} tasks, but {', '.join(missing)} not set: "
                          "start the command with srun (one process per node or per GPU), or set "
                          "mesh.distributed=off to train in this one process")
    port = str(int(env["SLURM_JOB_ID"]) % 2 ** 12 + 65535 - 2 ** 12 + 1) if env["SLURM_JOB_ID"].isdigit() else "1234"
    coord = _coordinator(env, slurm_first_host(env["SLURM_STEP_NODELIST"]), port)
    local = _local_size(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"))
    return Launch("slurm", _int(env, "SLURM_PROCID"), count, coord, explicit=local == 1)


def _tpu_gke(env) -> Launch | None:
    hosts_var = "TPU_PROCESS_ADDRESSES" if env.get("TPU_PROCESS_ADDRESSES") else "TPU_WORKER_HOSTNAMES"
    hosts = [h.strip() for h in env.get(hosts_var, "").split(",") if h.strip()]
    slices = _int(env, "MEGASCALE_NUM_SLICES", 1)
    if not hosts or len(hosts) * slices <= 1:
        return None
    if "TPU_WORKER_ID" not in env:
        raise LaunchError(f"{hosts_var} lists {len(hosts)} TPU hosts but TPU_WORKER_ID is not set")
    pid = _int(env, "TPU_WORKER_ID") + _int(env, "MEGASCALE_SLICE_ID", 0) * len(hosts)
    host = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or hosts[0]).split(":")[0]
    return Launch("tpu-gke", pid, len(hosts) * slices, _coordinator(env, host, TPU_PORT))


def _tpu_vm(env, metadata: Callable[[str], str | None] | None) -> Launch | None:
    if env.get("TPU_SKIP_MDS_QUERY") is not None:
        return None
    metadata = metadata or (_gce_metadata if _has_tpu_chips() else None)
    endpoints = metadata("worker-network-endpoints") if metadata else None
    if not endpoints:
        return None
    hosts = [w.split(":")[2] if w.count(":") == 2 else w for w in endpoints.split(",") if w.strip()]
    slices = _int(env, "MEGASCALE_NUM_SLICES", 1)
    if len(hosts) * slices <= 1:
        return None
    worker = metadata("agent-worker-number")
    pid = None if worker is None else int(worker) + _int(env, "MEGASCALE_SLICE_ID", 0) * len(hosts)
    host = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or hosts[0]).split(":")[0]
    return Launch("tpu-vm", pid, len(hosts) * slices, _coordinator(env, host, TPU_PORT))


def _has_tpu_chips() -> bool:
    dev = Path("/dev")
    return any(dev.glob("accel[0-9]*")) or any(p.name.isdigit() for p in dev.glob("vfio/*"))


def _gce_metadata(key: str) -> str | None:
    """``instance/attributes/<key>`` of the GCE metadata server (None when unreachable / absent)."""
    import urllib.request

    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    req = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                 headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def detect(environ: Mapping[str, str] | None = None,
           metadata: Callable[[str], str | None] | None = None) -> Launch | None:
    """The multi-process launch this process belongs to, or None (one process). ``metadata(key)``: the TPU VM
    metadata lookup (default: the GCE metadata server, asked only where TPU chips are present)."""
    env = os.environ if environ is None else environ
    for find in (_explicit, _openmpi, _slurm, _tpu_gke):
        launch = find(env)
        if launch is not None:
            return launch
    return _tpu_vm(env, metadata)


def initialize(mesh_cfg, environ: Mapping[str, str] | None = None,
               metadata: Callable[[str], str | None] | None = None) -> Launch | None:
    """``jax.distributed.initialize()`` when ``mesh.distributed`` is "on", or "auto" and a launcher is detected;
    must run before any other JAX call. A coordinator that does not answer within ``mesh.init_timeout_s`` is a
    :class:`LaunchError` naming it."""
    import jax

    if mesh_cfg.distributed == "off":
        return None
    env = os.environ if environ is None else environ
    launch = detect(env, metadata)
    if launch is None:
        if mesh_cfg.distributed == "auto":
            return None
        launch = Launch("jax auto-detection", None, None, env.get("JAX_COORDINATOR_ADDRESS"))
    timeout = int(mesh_cfg.init_timeout_s)
    # JAX aborts the process (a C++ fatal error, no Python exception) when its own timeout runs out: the watchdog
    # below stops this process first, with one line, so JAX's timeout is set a little later.
    kwargs = {**launch.kwargs(), "initialization_timeout": timeout + INIT_MARGIN_S,
              "heartbeat_timeout_seconds": int(mesh_cfg.heartbeat_timeout_s)}
    try:
        accepted = inspect.signature(jax.distributed.initialize).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    except (TypeError, ValueError):
        pass
    role = ("this process is the coordinator and the others did not all connect" if launch.process_id == 0
            else "the coordinator (process 0) did not answer")
    text = (f"could not join the other processes within mesh.init_timeout_s={timeout} s: {role}; "
            f"{launch.describe()}. Check that every process was started and that every host reaches the "
            "coordinator's address and port")
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            print(f"error: {text}", file=sys.stderr, flush=True)
            os._exit(2)  # the runtime is blocked in C++; nothing of this run exists yet

    threading.Thread(target=watchdog, name="dreamomni2-init-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JaxRuntimeError / RuntimeError / ValueError from the runtime
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LaunchError(f"{text} ({first})") from None
    finally:
        done.set()
    return launch


# --------------------------------------------------------------------------- checks at start


def _allgather(values):
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))


def _hash(obj) -> int:
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "little", signed=True)


def flat_config(cfg) -> dict:
    """``{"section.key": value}`` of a config, without :data:`PER_HOST_KEYS`."""
    return {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() for k, v in d.items()
            if f"{sec}.{k}" not in PER_HOST_KEYS}


def check_same_config(cfg) -> None:
    """Every process must run the same resolved config (``--config`` and every ``--set``): per-key hashes are
    gathered; each process raises :class:`LaunchError` naming the first key that differs."""
    import jax

    if jax.process_count() == 1:
        return
    flat = flat_config(cfg)
    keys = sorted(flat)
    head = _allgather([len(keys), _hash(keys)])
    if (head != head[0]).any():
        raise LaunchError("the processes run different versions of dreamomni2_jax (their configs have different "
                          "keys); install the same version on every host")
    table = _allgather([_hash(flat[k]) for k in keys])
    for i, key in enumerate(keys):
        differ = [p for p in range(table.shape[0]) if table[p, i] != table[0, i]]
        if differ:
            raise LaunchError(f"the processes run different configs: {key} differs on process(es) "
                              f"{', '.join(map(str, differ))} from process 0 (here, process {jax.process_index()}: "
                              f"{flat[key]!r}); start every process with the same --config and --set overrides")


def check_shared_run_dir(run_dir: str | Path) -> None:
    """``train.run_dir`` must be one folder every host sees: process 0 writes a token there, every other process
    must read it back after a barrier. Otherwise every process raises :class:`LaunchError` naming the path."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    run_dir = Path(run_dir).absolute()
    marker = run_dir / MARKER
    token = int(multihost_utils.broadcast_one_to_all(np.int32(int.from_bytes(os.urandom(4), "little") >> 1)))
    problem = None
    if jax.process_index() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(token))
        except OSError as e:
            problem = f"process 0 cannot write {marker}: {e}"
    multihost_utils.sync_global_devices("dreamomni2_run_dir_marker")
    if jax.process_index() != 0:
        seen, deadline = None, time.monotonic() + MARKER_WAIT_S
        while True:  # NFS / gcsfuse may cache "no such file" for a few seconds: list the folder, retry
            try:
                os.listdir(run_dir)
                seen = marker.read_text().strip()
            except OSError:
                seen = None
            if seen == str(token) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if seen != str(token):
            problem = (f"train.run_dir {run_dir} is not shared between hosts: process {jax.process_index()} does "
                       f"not see the file {MARKER} that process 0 wrote there; the run directory must be on storage "
                       "visible to every host (the same path on each)")
    bad = _allgather([problem is not None])
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    if bad.any():
        lost = [str(p) for p in range(bad.shape[0]) if bad[p]]
        raise LaunchError(problem or f"train.run_dir {run_dir} is not shared between hosts: process(es) "
                                     f"{', '.join(lost)} do not see the file {MARKER} that this process (0) wrote "
                                     "there; the run directory must be on storage visible to every host")


def agreed(fn: Callable[[], object]):
    """``fn()`` on this process; if it raises a :class:`UserError` on any process, every process raises (the
    failing one its own error, the others a :class:`LaunchError` naming it) instead of the others waiting in a
    collective for a process that has stopped."""
    import jax

    err = None
    try:
        result = fn()
    except UserError as e:
        err, result = e, None
    if jax.process_count() == 1:
        if err is not None:
            raise err
        return result
    bad = _allgather([err is not None])
    if err is not None:
        raise err
    if bad.any():
        failed = ", ".join(str(p) for p in range(bad.shape[0]) if bad[p])
        raise LaunchError(f"process(es) {failed} stopped at start (see the error line in their output); "
                          f"process {jax.process_index()} stops with them")
    return result


# --------------------------------------------------------------------------- a lost process


LOST_PEER = re.compile(r"connection reset|connection refused|broken pipe|socket closed|heartbeat|unhealthy|"
                       r"\bUNAVAILABLE\b|peer|gloo|nccl|task .* (?:died|failed)|coordination service", re.I)


def is_lost_process_error(err: BaseException) -> bool:
    """Whether a runtime error says another process is gone (a failed collective / coordination service error)."""
    return bool(LOST_PEER.search(str(err)))


def lost_process_message(err: BaseException, checkpoint: str | None = None) -> str:
    """One line for a runtime error raised because another process died or became unreachable."""
    import jax

    text = " ".join(str(err).split())
    peers = sorted({int(m) for m in re.findall(r"\b(?:task|process)[ _:#]*(\d+)", text, re.I)}
                   - {jax.process_index()})
    if not peers and jax.process_count() == 2:
        peers = [1 - jax.process_index()]
    who = f"process {', '.join(map(str, peers))}" if peers else "another process"
    last = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return (f"process {jax.process_index()} of {jax.process_count()} lost contact with {who} (it died or its "
            f"host is unreachable; {text[:160]}); {last}; restart every process with the same command to resume")
