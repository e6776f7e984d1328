"""Training across machines: real worker processes on 127.0.0.1 under
MultiWorkerMirroredStrategy (step1's custom distributed step), SIGKILL and --resume, the
Slurm cluster, and the sharding of each epoch across replicas."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY, last_line, write_h5

import step1_train_model as step1
from gbmpcnsl.data import HDF5Images, make_dataset, make_shard_dataset, shard_layout
from gbmpcnsl.runs import backup_epoch
from gbmpcnsl.slurm import SLURM_PORT_BASE, is_other_worker, slurm_cluster_resolver, slurm_task
from gbmpcnsl_common import UserError

ROOT = Path(__file__).resolve().parent.parent
HISTORY_COLUMNS = ["epoch", "accuracy", "auc", "learning_rate", "loss", "val_accuracy", "val_auc", "val_loss"]
# Seconds for all the waits of one test together (its starts, its runs, its retries). A run
# takes about a minute on an idle 2-core machine; on one shared with other work (a load of
# 7-10) the first epoch alone took 145 s and the SIGKILL-and-resume test 403 s in all.
# pytest-timeout's limit is a minute more.
TEST_BUDGET = 480


# ---------------------------------------------------------------------------- helpers
def free_ports(count: int) -> tuple[list[int], list[socket.socket]]:
    """Ports the kernel hands out for port 0, with their sockets still bound (close them
    just before the workers start; a worker that then loses the race is started again)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    return [sock.getsockname()[1] for sock in sockets], sockets


class Cluster:
    """Two (or more) step1 worker processes with a TF_CONFIG each, their stderr in files,
    started through conftest's `processes` (killed at teardown, whatever happens). Every
    wait ends at `deadline` (time.monotonic()). With `dump`, each worker runs through
    tests/multiworker_worker.py, which writes its final weights and the records it trained
    on into `dump`."""

    def __init__(self, processes, tmp_path: Path, argv: list[str], deadline: float, dump: Path | None = None):
        self.spawn, self.tmp_path, self.argv, self.deadline, self.dump = (
            processes,
            tmp_path,
            argv,
            deadline,
            dump,
        )
        self.workers = 2
        self.scratch = tmp_path / "tmp"  # the workers' TMPDIR
        self.scratch.mkdir(exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.launches = 0

    def start(self) -> Cluster:
        for _ in range(3):  # a port taken by someone else between close() and the worker's bind
            ports, sockets = free_ports(self.workers)
            cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
            for sock in sockets:
                sock.close()
            self.launches += 1
            self.processes = []
            for index in range(self.workers):
                tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
                env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"}
                env["TMPDIR"] = str(self.scratch)  # where a SIGKILLed worker leaves its scratch folder
                with open(self.stderr_path(index), "w") as stderr:
                    process = self.spawn.popen(
                        self.command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
                    )
                    self.processes.append(process)
            started = self.wait_until(self.started_or_lost_port)
            assert started, f"the workers did not start in time: {self.stderr(0)[-3000:]}"
            if not self.lost_port():
                return self
            self.kill()
        raise AssertionError(f"no free ports after 3 tries: {self.stderr(0)}")

    def command(self) -> list[str]:
        if self.dump is None:
            return [sys.executable, "step1_train_model.py", *self.argv]
        return [sys.executable, "tests/multiworker_worker.py", str(self.dump), *self.argv]

    def stderr_path(self, index: int) -> Path:
        return self.tmp_path / f"worker_{index}.{self.launches}.stderr"

    def stderr(self, index: int) -> str:
        return self.stderr_path(index).read_text()

    def lost_port(self) -> bool:
        return any("Could not start gRPC server" in self.stderr(i) for i in range(self.workers))

    def started_or_lost_port(self) -> bool:
        # "batch size ... per replica" is logged once the strategy (and its server) is up.
        started = all("per replica" in self.stderr(i) for i in range(self.workers))
        return started or self.lost_port() or any(p.poll() is not None for p in self.processes)

    def wait_until(self, condition) -> bool:
        """Poll `condition` (files or log lines) until it holds, the deadline passes or a
        worker exits; returns whether it held."""
        while time.monotonic() < self.deadline:
            if condition():
                return True
            if any(p.poll() is not None for p in self.processes):
                return condition()
            time.sleep(0.05)
        return False

    def wait(self) -> list[int]:
        """The workers' exit codes; subprocess.TimeoutExpired at the deadline."""
        return [p.wait(timeout=max(0.0, self.deadline - time.monotonic())) for p in self.processes]

    def kill(self, index: int | None = None) -> None:
        for i, process in enumerate(self.processes):
            if index is None or i == index:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)


def history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def split_indices(run_dir: Path, subset: str) -> list[int]:
    with open(run_dir / "split.csv", newline="") as handle:
        return [i for i, row in enumerate(csv.DictReader(handle)) if row["subset"] == subset]


def worker_weights(dump: Path, index: int) -> list[np.ndarray]:
    with np.load(dump / f"worker_{index}_weights.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def worker_seen(dump: Path, index: int) -> dict[int, list[int]]:
    return {
        int(epoch): seen
        for epoch, seen in json.loads((dump / f"worker_{index}_seen.json").read_text()).items()
    }


@pytest.fixture(scope="module")
def cohort_h5(tmp_path_factory) -> Path:
    """8 patients x 3 slices at 32x32: 18 training and 6 validation slices with seed 0."""
    return write_h5(tmp_path_factory.mktemp("multiworker") / "d.h5", patients=(4, 4), slices=3)


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(
    ("count", "replicas", "batch_size"), [(18, 2, 8), (17, 2, 8), (16, 2, 8), (7, 3, 2), (5, 2, 1)]
)
def test_shard_layout_gives_every_position_once_and_no_replica_an_empty_batch(count, replicas, batch_size):
    layout = shard_layout(count, replicas, batch_size)
    pieces = [range(layout[s, r], layout[s, r + 1]) for s in range(len(layout)) for r in range(replicas)]
    positions = [p for piece in pieces for p in piece]
    assert positions == list(range(count))  # step by step, replica by replica: the epoch's order
    assert min(len(piece) for piece in pieces) >= 1
    assert len(layout) == max(1, min(-(-count // (replicas * batch_size)), count // replicas))
    global_sizes = np.diff(layout[:, [0, -1]], axis=1)
    assert global_sizes.max() - global_sizes.min() <= 1
    if batch_size > 1:
        assert max(len(piece) for piece in pieces) <= batch_size
    with pytest.raises(UserError, match="2 slice"):
        shard_layout(2, 3, 8)


def test_worker_shards_are_the_single_machine_epoch_cut_in_pieces(tmp_path):
    """Each replica's stream holds its positions of make_dataset's epoch, with the same
    images (augmentation draws included); together the replicas cover the epoch once."""
    h5_path = write_h5(tmp_path / "d.h5", size=16, patients=(5, 5), slices=3)
    reader = HDF5Images(h5_path, (16, 16))
    labels = np.array([0] * 15 + [1] * 15, np.float32)
    train = np.array([i for i in range(30) if i % 5], np.int64)  # 24 records
    layout = shard_layout(len(train), 3, 4)  # 2 steps of 12: pieces of 4
    single = make_dataset(reader, train, labels, 24, "base", seed=1, epochs=(1, 3))
    single_images = [x.numpy() for x, _ in single]  # one batch per epoch
    shards = [
        [
            tuple(t.numpy() for t in element)
            for element in make_shard_dataset(reader, train, labels, layout, [r], "base", 1, (1, 3))
        ]
        for r in range(3)
    ]
    for epoch in range(2):
        images, indices = [], []
        for step in range(len(layout)):
            for replica in range(3):
                image, label, index, global_size = shards[replica][epoch * len(layout) + step]
                assert global_size == 12 and np.array_equal(label[:, 0], labels[index])
                images.append(image)
                indices.extend(index)
        np.testing.assert_array_equal(np.concatenate(images), single_images[epoch])
        assert sorted(indices) == sorted(train.tolist()) and len(set(indices)) == len(train)
    ordered = make_shard_dataset(reader, train, labels, layout, [0, 1, 2])
    assert np.concatenate([index.numpy() for _, _, index, _ in ordered]).tolist() == train.tolist()


# ---------------------------------------------------------------------------- Slurm
def test_slurm_variables_give_the_cluster_and_the_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not is_other_worker() and slurm_task() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert slurm_task() == 1 and is_other_worker()
    port = SLURM_PORT_BASE + 123456 % 20000
    resolver = slurm_cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": [f"gpu07:{port}", f"gpu08:{port}"]}
    assert resolver.get_task_info() == ("worker", 1)
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert not is_other_worker()
    # A TF_CONFIG wins over Slurm's variables.
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}),
    )
    assert is_other_worker()


@pytest.mark.slow
@pytest.mark.timeout(TEST_BUDGET + 60)
def test_one_slurm_task_trains_with_mixed_precision(tmp_path, cohort_h5):
    """srun's variables, no TF_CONFIG: --distribute multiworker builds its one-worker cluster
    from Slurm (port SLURM_PORT_BASE + job id % 20000), under mixed_float16."""
    deadline = time.monotonic() + TEST_BUDGET
    for _ in range(3):  # a port taken between the check and the worker's bind: try another
        job_id = next(j for j in random.sample(range(20000), 500) if _port_is_free(SLURM_PORT_BASE + j))
        env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
        env.update(
            SLURM_JOB_ID=str(job_id),
            SLURM_PROCID="0",
            SLURM_STEP_NODELIST="127.0.0.1",
            SLURM_STEP_NUM_TASKS="1",
            SLURM_STEP_TASKS_PER_NODE="1",
            TF_CPP_MIN_LOG_LEVEL="3",
        )
        run_dir = tmp_path / f"run{job_id}"
        argv = [
            "--epochs",
            "1",
            *TINY,
            "--distribute",
            "multiworker",
            "--mixed-precision",
            str(cohort_h5),
            str(run_dir),
        ]
        result = subprocess.run(
            [sys.executable, "step1_train_model.py", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if "Could not start gRPC server" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 1 replica(s) = global batch 8 (MultiWorkerMirroredStrategy)" in result.stderr
    assert [row["epoch"] for row in history(run_dir)] == ["0"]
    (checkpoint,) = run_dir.glob("ckpt_001_*.keras")
    from gbmpcnsl.checkpoints import load_model_for_inference

    model = load_model_for_inference(checkpoint)
    assert model.get_layer("stem_conv").dtype_policy.name == "mixed_float16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# ---------------------------------------------------------------------------- two workers
def check_chief_run_folder(run_dir: Path, rows: list[dict]) -> None:
    """The chief's run folder is that of a single-machine run; the other worker wrote none."""
    assert list(rows[0]) == HISTORY_COLUMNS
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["replicas"] == 2 and run["global_batch_size"] == 16
    names = {p.name for p in run_dir.iterdir()}
    assert {"history.csv", "run.json", "split.csv"} <= names and not {"backup", "workers"} & names
    val_losses = [float(row["val_loss"]) for row in rows]
    assert run["best_checkpoint"] == f"ckpt_{int(np.argmin(val_losses)) + 1:03d}_{min(val_losses):.4f}.keras"
    assert "val_predictions.csv" in names  # the chief predicts its validation slices at the end
    others = names - {"history.csv", "run.json", "split.csv", "val_predictions.csv"}
    assert all(name.startswith("ckpt_") for name in others)


def check_last_validation_numbers(cohort_h5: Path, run_dir: Path, weights: list, last: dict) -> None:
    """The validation numbers of the last epoch come from every worker's predictions: the
    final weights, applied to the whole validation set in this process, give them back."""
    import keras
    from sklearn.metrics import roc_auc_score

    from gbmpcnsl.model import build_model

    model = build_model("efficientnetb0", (32, 32, 3), None)
    model.set_weights(weights)
    val = split_indices(run_dir, "val")
    with h5py.File(cohort_h5, "r") as h5file:
        images = np.concatenate([h5file[f"{c}/32_32/features"][:] for c in ("gbm", "pcnsl")])[val]
        labels = np.concatenate([h5file[f"{c}/32_32/labels"][:] for c in ("gbm", "pcnsl")])[val]
    probabilities = model.predict(images.astype(np.float32), verbose=0)[:, 0]
    y = labels.astype(np.float32)[:, None]
    expected_loss = float(keras.losses.BinaryCrossentropy()(y, probabilities[:, None]))
    auc = keras.metrics.AUC()
    auc.update_state(y, probabilities[:, None])
    assert float(last["val_loss"]) == pytest.approx(expected_loss, abs=1e-5)
    assert float(last["val_accuracy"]) == pytest.approx(np.mean((probabilities > 0.5) == labels))
    assert float(last["val_auc"]) == pytest.approx(float(auc.result()), abs=1e-6)
    # Keras's AUC ranks the predictions by its 200 thresholds (i / 199): so does this score.
    assert float(last["val_auc"]) == pytest.approx(
        roc_auc_score(labels, np.ceil(probabilities * 199)), abs=1e-4
    )


@pytest.mark.slow
@pytest.mark.timeout(TEST_BUDGET + 60)
def test_two_workers_train_one_model_through_a_sigkill_and_resume(tmp_path, cohort_h5, processes):
    """Two workers train 4 epochs as one model; both die (SIGKILL) after the first backup;
    --resume restores both from the backup and they finish the run in step, the chief
    writing the run folder of a single-machine run."""
    dump = tmp_path / "dump"
    dump.mkdir()
    run_dir = tmp_path / "run"
    argv = ["--augmentation", "base", "--epochs", "4", *TINY, "--distribute", "multiworker"]
    argv += [str(cohort_h5), str(run_dir)]
    deadline = time.monotonic() + TEST_BUDGET
    cluster = Cluster(processes, tmp_path, argv, deadline).start()
    metadata = run_dir / "backup" / "training_metadata.json"
    assert cluster.wait_until(lambda: metadata.is_file() and history(run_dir)), cluster.stderr(0)[-3000:]
    cluster.kill(1)  # the other worker dies mid-training...
    cluster.kill(0)  # ...and the job with it (the chief would wait for it in vain)
    assert "x 2 replica(s) = global batch 16 (MultiWorkerMirroredStrategy)" in cluster.stderr(0)
    finished = backup_epoch(run_dir / "backup")  # at least 2 of the 4 epochs are left
    killed_scratch = set(cluster.scratch.glob("gbmpcnsl-worker-*"))  # the killed worker 1's
    assert 1 <= finished < 3 and json.loads((run_dir / "run.json").read_text())["status"] == "running"

    resumed = Cluster(processes, tmp_path, [*argv, "--resume"], deadline, dump=dump)
    resumed.launches = cluster.launches
    resumed.start()
    assert resumed.wait() == [0, 0], resumed.stderr(0)[-3000:] + resumed.stderr(1)[-3000:]
    assert set(resumed.scratch.glob("gbmpcnsl-worker-*")) == killed_scratch  # the resumed one removed its own
    assert f"resuming {run_dir} after epoch {finished} of 4" in resumed.stderr(0)
    assert "x 2 replica(s) = global batch 16 (MultiWorkerMirroredStrategy)" in resumed.stderr(0)
    rows = history(run_dir)
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert json.loads((run_dir / "run.json").read_text())["resumed"][0]["after_epoch"] == finished
    check_chief_run_folder(run_dir, rows)
    # Both workers logged the same (resumed) epochs, with the same numbers.
    epoch_lines = [
        [line for line in resumed.stderr(i).splitlines() if line.startswith("epoch ")] for i in (0, 1)
    ]
    strip_seconds = [[line.rsplit(" (", 1)[0] for line in lines] for lines in epoch_lines]
    assert len(strip_seconds[0]) == 4 - finished and strip_seconds[0] == strip_seconds[1]

    # One model: both workers restored the same state and ended with identical weights.
    weights = [worker_weights(dump, i) for i in (0, 1)]
    assert len(weights[0]) == len(weights[1]) > 100
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))

    # Each remaining epoch covers the training set once across the workers, each worker a part.
    train = split_indices(run_dir, "train")
    seen = [worker_seen(dump, i) for i in (0, 1)]
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(finished, 4))
    for epoch in range(finished, 4):
        assert sorted(seen[0][epoch] + seen[1][epoch]) == train
        assert seen[0][epoch] and seen[1][epoch]
    assert seen[0][finished] != seen[0][finished + 1]  # reshuffled every epoch
    check_last_validation_numbers(cohort_h5, run_dir, weights[0], rows[-1])


def test_a_slurm_variable_that_is_not_a_number_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from helpers import TINY, write_h5

    h5_path = write_h5(tmp_path / "d.h5")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_PROCID", "1a")
    assert step1.main([*TINY, "--distribute", "multiworker", str(h5_path), str(tmp_path / "run")]) == 2
    assert last_line(capsys.readouterr().err) == (
        "error: SLURM_PROCID='1a': not a whole number (Slurm sets it; check the job script)"
    )
    assert not (tmp_path / "run").exists()
