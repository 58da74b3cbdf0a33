"""Launcher detection from environment variables (no cluster needed), the init timeout and the start checks.

The table mirrors JAX's own cluster detection (``jax/_src/clusters``): the same variables, the same order
(Open MPI before SLURM before TPU), the same coordinator host and port where JAX derives one.
"""
from __future__ import annotations

import os

import pytest

from dreamomni2_jax import multihost as mh
from dreamomni2_jax.config import Config, MeshConfig, override

NO_METADATA = {"TPU_SKIP_MDS_QUERY": "1"}  # never ask a metadata server from a test
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911", "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004,007],login1", "SLURM_NTASKS": "24",
        "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x3)"}
GKE = {"TPU_WORKER_HOSTNAMES": "w-0.js,w-1.js,w-2.js,w-3.js", "TPU_WORKER_ID": "2", "JOBSET_NAME": "js"}
MEGA = {**GKE, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
        "MEGASCALE_COORDINATOR_ADDRESS": "js-slice-0-0.js:8080"}
OMPI_PORT = str(1531576320 // 4096 % 4096 + 61440)  # JAX's port rule for Open MPI (job id)
SLURM_PORT = str(4242 % 4096 + 61440)  # ... and for SLURM

# (case, environment, (launcher, process id, process count, coordinator, explicit)) ; None: one process
TABLE = [
    ("nothing", {}, None),
    ("explicit JAX variables", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                "JAX_PROCESS_ID": "1"}, ("jax", 1, 4, "10.0.0.1:1234", True)),
    ("explicit, one process", {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
     None),
    ("explicit JAX variables win over mpirun", {**OMPI, "JAX_COORDINATOR_ADDRESS": "h0:5", "JAX_NUM_PROCESSES": "2",
                                                "JAX_PROCESS_ID": "0"}, ("jax", 0, 2, "h0:5", True)),
    ("xpk GPU JobSet (NNODES / NODE_RANK)", {"JAX_COORDINATOR_ADDRESS": "js-gpu-0-0.js", "JAX_COORDINATOR_PORT": "6002",
                                           "NNODES": "2", "NODE_RANK": "1", "JOBSET_NAME": "js"},
     ("jax", 1, 2, "js-gpu-0-0.js:6002", True)),
    ("mpirun (Open MPI 4), 8 per node", OMPI, ("openmpi", 3, 16, f"10.96.0.1:{OMPI_PORT}", False)),
    ("mpirun, JAX_COORDINATOR_ADDRESS", {**OMPI, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:9"},
     ("openmpi", 3, 16, "127.0.0.1:9", False)),
    ("mpirun, JAX_COORDINATOR_PORT", {**OMPI, "JAX_COORDINATOR_PORT": "7777"}, ("openmpi", 3, 16, "10.96.0.1:7777",
                                                                                  False)),
    ("mpirun -npernode 1 (all GPUs of a host)", {**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"},
     ("openmpi", 3, 16, f"10.96.0.1:{OMPI_PORT}", True)),
    ("mpirun -np 1", {**OMPI, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, None),
    ("Open MPI 5 with JAX_COORDINATOR_ADDRESS", {**{k: v for k, v in OMPI.items() if "hnp" not in k},
                                                 "JAX_COORDINATOR_ADDRESS": "n0:8"}, ("openmpi", 3, 16, "n0:8", True)),
    ("srun, 8 tasks per node", SRUN, ("slurm", 9, 24, f"gpu003:{SLURM_PORT}", False)),
    ("srun --ntasks-per-node=1", {**SRUN, "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                                  "SLURM_STEP_TASKS_PER_NODE": "1(x3)"}, ("slurm", 2, 3, f"gpu003:{SLURM_PORT}", True)),
    ("srun, plain node list", {**SRUN, "SLURM_STEP_NODELIST": "a100x,b"}, ("slurm", 9, 24, f"a100x:{SLURM_PORT}",
                                                                            False)),
    ("sbatch job of one task", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ("mpirun inside SLURM: Open MPI first, as JAX", {**SRUN, **OMPI}, ("openmpi", 3, 16, f"10.96.0.1:{OMPI_PORT}",
                                                                        False)),
    ("GKE TPU slice (xpk JobSet)", GKE, ("tpu-gke", 2, 4, "w-0.js:8482", False)),
    ("GKE TPU_PROCESS_ADDRESSES first", {**GKE, "TPU_PROCESS_ADDRESSES": "p0:8476,p1:8476"},
     ("tpu-gke", 2, 2, "p0:8482", False)),
    ("GKE multi-slice (MEGASCALE_*)", MEGA, ("tpu-gke", 6, 8, "js-slice-0-0.js:8482", False)),
    ("single-host TPU VM", {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, None),
]


@pytest.mark.parametrize("case,env,want", TABLE, ids=[c for c, _, _ in TABLE])
def test_detect(case, env, want):
    launch = mh.detect({**NO_METADATA, **env})
    got = None if launch is None else (launch.launcher, launch.process_id, launch.num_processes,
                                       launch.coordinator, launch.explicit)
    assert got == want, case


def test_tpu_vm_slice_from_metadata():
    """``gcloud compute tpus tpu-vm ssh --worker=all``: the workers come from the metadata server, as in JAX."""
    md = {"worker-network-endpoints": "t1v-n-0:0:10.0.0.2,t1v-n-1:1:10.0.0.3", "agent-worker-number": "1"}
    launch = mh.detect({}, metadata=md.get)
    assert (launch.launcher, launch.process_id, launch.num_processes, launch.coordinator, launch.explicit) == (
        "tpu-vm", 1, 2, "10.0.0.2:8482", False)
    assert mh.detect({}, metadata={"worker-network-endpoints": "h0"}.get) is None  # one host
    assert mh.detect({}, metadata=lambda k: None) is None  # no metadata server


@pytest.mark.parametrize("env,match", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "start the command with srun"),
    ({"JAX_NUM_PROCESSES": "4"}, "needs JAX_PROCESS_ID"),
    ({k: v for k, v in OMPI.items() if "hnp" not in k}, "set JAX_COORDINATOR_ADDRESS"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_ID is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
])
def test_incomplete_launch_is_one_clear_error(env, match):
    with pytest.raises(mh.LaunchError, match=match):
        mh.detect({**NO_METADATA, **env})


def test_slurm_first_host_agrees_with_jax():
    for nodelist, first in [("node001", "node001"), ("node001,host2", "node001"), ("node[001-0015],host2", "node001"),
                            ("node[001,007-015],host2", "node001"), ("gpu-a[7]", "gpu-a7")]:
        assert mh.slurm_first_host(nodelist) == first


def test_initialize_passes_timeouts_and_explicit_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **k: calls.append(k))
    env = {**NO_METADATA, **SRUN, "SLURM_STEP_TASKS_PER_NODE": "1(x24)"}
    launch = mh.initialize(MeshConfig(init_timeout_s=12, heartbeat_timeout_s=7), env)
    assert launch.launcher == "slurm"
    assert calls == [{"coordinator_address": f"gpu003:{SLURM_PORT}", "num_processes": 24, "process_id": 9,
                      "cluster_detection_method": "deactivate", "initialization_timeout": 12 + mh.INIT_MARGIN_S,
                      "heartbeat_timeout_seconds": 7}]
    calls.clear()
    mh.initialize(MeshConfig(), {**NO_METADATA, **GKE})  # JAX detects a TPU slice itself: only the timeouts
    assert calls == [{"initialization_timeout": 300 + mh.INIT_MARGIN_S, "heartbeat_timeout_seconds": 100}]
    assert mh.initialize(MeshConfig(distributed="off"), GKE) is None and len(calls) == 1


def test_initialize_error_names_coordinator_and_timeout(monkeypatch):
    def fail(**k):
        raise RuntimeError("DEADLINE_EXCEEDED: Deadline Exceeded\nmore lines")

    monkeypatch.setattr("jax.distributed.initialize", fail)
    env = {**NO_METADATA, "JAX_COORDINATOR_ADDRESS": "10.1.2.3:4567", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    with pytest.raises(mh.LaunchError) as e:
        mh.initialize(MeshConfig(init_timeout_s=9), env)
    text = str(e.value)
    assert "10.1.2.3:4567" in text and "mesh.init_timeout_s=9 s" in text and "\n" not in text


def test_mesh_timeouts_are_config():
    assert MeshConfig().init_timeout_s == 300 and MeshConfig().heartbeat_timeout_s == 100
    from dreamomni2_jax.config import ConfigError

    with pytest.raises(ConfigError, match="mesh.init_timeout_s"):
        Config(mesh=MeshConfig(init_timeout_s=0))


def test_config_fingerprint_keys():
    cfg = override(Config(), train=dict(run_dir="/a"))
    flat = mh.flat_config(cfg)
    assert "train.run_dir" not in flat and "train.steps" in flat and "mesh.init_timeout_s" in flat
    assert mh.flat_config(override(cfg, train=dict(run_dir="/b"))) == flat  # a mount point may differ per host


def test_lost_process_errors():
    assert mh.is_lost_process_error(RuntimeError("UNKNOWN: Gloo all-reduce failed: Read error: Connection reset by "
                                                 "peer"))
    assert mh.is_lost_process_error(RuntimeError("UNAVAILABLE: Task 1 heartbeat timeout"))
    assert not mh.is_lost_process_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 GiB"))


def test_lost_process_message(monkeypatch):
    monkeypatch.setattr("jax.process_index", lambda: 0)
    monkeypatch.setattr("jax.process_count", lambda: 4)
    line = mh.lost_process_message(RuntimeError("UNAVAILABLE: Task 3 heartbeat timeout.\nmore"), "/r/checkpoints/8")
    assert line.startswith("process 0 of 4 lost contact with process 3") and "\n" not in line
    assert "the last checkpoint is /r/checkpoints/8" in line
    assert "no checkpoint was written yet" in mh.lost_process_message(RuntimeError("gloo: reset"))


@pytest.mark.parametrize("case", ["mpirun (Open MPI 4), 8 per node", "mpirun, JAX_COORDINATOR_PORT",
                                  "srun, 8 tasks per node", "srun, plain node list",
                                  "mpirun inside SLURM: Open MPI first, as JAX"])
def test_agrees_with_jax_own_detection(case, monkeypatch):
    """Cross-check against the installed JAX's cluster detection (a private module: skipped if it moved)."""
    try:
        from jax._src import clusters
    except ImportError:
        pytest.skip("jax._src.clusters moved")
    env = next(e for c, e, _ in TABLE if c == case)
    for k in [k for k in os.environ if k.startswith(("OMPI_", "SLURM_", "JAX_", "TPU_", "MEGASCALE_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        coord, count, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None,
                                                                                         None)
    except TypeError:
        pytest.skip("auto_detect_unset_distributed_params has another signature in this JAX")
    launch = mh.detect({**NO_METADATA, **env})
    assert (launch.coordinator, launch.num_processes, launch.process_id) == (coord, count, pid)
