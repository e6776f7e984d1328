"""Slurm: this process's task, whether it is a multi-worker run's chief, and the cluster
resolver of an srun job step (for gbmpcnsl.distributed's MultiWorkerMirroredStrategy).
TensorFlow is imported lazily."""

from __future__ import annotations

import json
import os

from gbmpcnsl_common import UserError

SLURM_PORT_BASE = 20000  # the workers listen on SLURM_PORT_BASE + (job id % 20000) + task on node


def slurm_int(name: str, value: str | None = None) -> int:
    """A whole-number Slurm variable (`value`: one part of it); UserError in one line when
    it is not one."""
    value = os.environ.get(name, "0") if value is None else value
    try:
        return int(value.split("(")[0])  # SLURM_STEP_TASKS_PER_NODE: "2(x3),1"
    except ValueError:
        raise UserError(
            f"{name}={value!r}: not a whole number (Slurm sets it; check the job script)"
        ) from None


def slurm_task() -> int | None:
    """This process's Slurm task number (SLURM_PROCID) inside an srun job step, else None."""
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
        return slurm_int("SLURM_PROCID")
    return None


def is_other_worker() -> bool:
    """True in a worker process of a multi-worker cluster (TF_CONFIG or Slurm) that is not
    its chief; known without importing TensorFlow."""
    try:
        config = json.loads(os.environ["TF_CONFIG"])
        kind, index = config["task"]["type"], int(config["task"]["index"])
        return not (kind == "chief" or (kind == "worker" and index == 0 and "chief" not in config["cluster"]))
    except (KeyError, ValueError, TypeError):
        return (slurm_task() or 0) > 0


def slurm_cluster_resolver():
    """tf.distribute's SlurmClusterResolver for the current srun step: one worker per Slurm
    task, on port SLURM_PORT_BASE + job id % 20000 (+ the task's rank on its node), so that
    two jobs sharing a node pick different ports. A task's GPUs are those Slurm gave it."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver
    port_base = SLURM_PORT_BASE + slurm_int("SLURM_JOB_ID") % 20000
    gpus = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if gpus:
        return resolver(port_base=port_base, gpus_per_node=len(gpus))
    # CPU nodes: no GPU to hand out (the resolver would otherwise run nvidia-smi).
    tasks_per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")
    most = max(slurm_int("SLURM_STEP_TASKS_PER_NODE", part) for part in tasks_per_node.split(","))
    return resolver(port_base=port_base, gpus_per_node=most, gpus_per_task=1, auto_set_gpu=False)
