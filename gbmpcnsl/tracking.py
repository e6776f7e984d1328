"""Optional MLflow tracking of a step1 run (--mlflow URI): the settings as parameters, the
command line as a tag, every epoch's metrics, and the finished run folder as artifacts.

MLflow is optional (pip install mlflow-skinny==3.17.2, the version tested beside TensorFlow
2.21; it changes none of requirements.txt's pins). A local store needs no server and no
network: --mlflow file:/path/to/mlruns (or a plain folder path); view it with `mlflow ui
--backend-store-uri file:/path/to/mlruns` (the full mlflow package). One MLflow run per
step1 run (experiment "gbm-pcnsl", run name = the run folder's name); with --folds, one
MLflow run for the whole cross-validation folder, without per-epoch metrics (each fold's
history.csv is among its artifacts). The run folder's backup/ (resume state) is not
uploaded.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from gbmpcnsl_common import UserError, first_line

EXPERIMENT = "gbm-pcnsl"
MLFLOW_PIN = "mlflow-skinny==3.17.2"
NOT_UPLOADED = ("backup",)


def import_mlflow():
    """mlflow, or a one-line UserError saying what to install."""
    try:
        import mlflow
    except ImportError as error:
        raise UserError(f"--mlflow needs MLflow: pip install {MLFLOW_PIN} ({error})") from error
    return mlflow


def tracking_uri(text: str) -> str:
    """--mlflow's value as MLflow's URI: a plain folder path becomes file:<absolute path>."""
    if "://" in text or text.startswith("file:"):
        return text
    return Path(text).resolve().as_uri()


def epoch_logger(mlflow):
    """A Keras callback logging each epoch's metrics (and learning rate) to the active run."""
    import keras

    class MLflowEpochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metrics = {key: float(value) for key, value in (logs or {}).items()}
            mlflow.log_metrics(metrics, step=epoch)

    return MLflowEpochs()


def log_run_folder(mlflow, run_dir: Path) -> None:
    """The run folder's files as the active run's artifacts (backup/ left out)."""
    for path in sorted(run_dir.iterdir()):
        if path.name in NOT_UPLOADED:
            continue
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        else:
            mlflow.log_artifact(str(path))


def start_run(mlflow, uri: str, name: str) -> None:
    """Start the MLflow run `name` in experiment EXPERIMENT of the store at `uri`; a store
    MLflow refuses is a one-line UserError. A file: store is MLflow's maintenance-mode
    backend, which it refuses unless MLFLOW_ALLOW_FILE_STORE is set: this tool opts in
    (the offline store that needs no database package)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(EXPERIMENT)
        mlflow.start_run(run_name=name)
    except mlflow.exceptions.MlflowException as error:
        raise UserError(f"--mlflow {uri}: {first_line(error)}") from error


@contextlib.contextmanager
def mlflow_run(config):
    """Yields the extra Keras callbacks of a run ([] without --mlflow, and with --folds:
    the folds' epochs would share one step axis). Inside, an MLflow run is active with the
    settings and the command line; after the body, the run folder is logged and the run
    ends (FAILED, with no artifacts, when the body raised; KILLED on Ctrl-C)."""
    if config.mlflow is None:
        yield []
        return
    mlflow = import_mlflow()
    run_dir = Path(config.run_dir)
    start_run(mlflow, tracking_uri(config.mlflow), run_dir.name)
    status = "FINISHED"
    try:
        mlflow.log_params({key: str(value) for key, value in config.arguments().items()})
        mlflow.set_tag("command", " ".join(config.command))
        yield [] if config.folds is not None else [epoch_logger(mlflow)]
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    else:
        log_run_folder(mlflow, run_dir)  # only a finished run's: a refused one may be another's
    finally:
        mlflow.end_run(status=status)
