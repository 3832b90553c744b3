"""A run's fitted model in MLflow: logged as an MLflow model (pytorch flavor) and loaded back (`load_model`)."""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np
import torch

import gmm

from .tracking import get_client, resolve_tracking_uri

MODEL_NAME = "model"  # the logged MLflow model: runs:/<run_id>/model
LEGACY_MODEL_ARTIFACT = "model/model.pt"  # what runs logged before the model became an MLflow model


def log_model(
    client, run_id: str, model: gmm.MixtureModel, train: torch.Tensor, step: int, metrics: Sequence | None = None
) -> None:
    """Log the fitted model as an MLflow model (flavor pytorch): the run's "Logged models" (an output at
    `step`), loadable with `mlflow.pytorch.load_model("runs:/<run_id>/model")` (a gmm.MixtureModel) or served
    by pyfunc, which maps rows (N, D) to their log densities (N,). `metrics` (the run's Metric entities at
    `step`, as logged) are linked to it in one write, as the same points (key, value, step and timestamp): given
    the run id, MLflow would read back the whole history of every metric of the run to find them (about 3% of
    a seed report's CPU time)."""
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import infer_signature

    from .tracking import fluent_tracking_uri, real_run_id

    run_id = real_run_id(client, run_id)  # the store's id: MLflow's fluent API below does not go through `client`

    snapshot = copy.deepcopy(model).cpu()
    snapshot.fit_result_ = None  # the fit record (curves, events) is the run's, not the model's
    example = train[:5].detach().cpu().numpy()
    with torch.no_grad():
        signature = infer_signature(example, snapshot(torch.as_tensor(example)).numpy())
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", "gmm-gd"]
    experiment_id = client.get_run(run_id).info.experiment_id
    # created here, so it belongs to the run's experiment (log_model alone would file it under the active one)
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="gmm")
    pytorch_log = logging.getLogger("mlflow.pytorch")
    level = pytorch_log.level
    pytorch_log.setLevel(logging.ERROR)  # its warning on pickled models: this project's own module, by design
    # without a run id MLflow would take a fluent run the caller has open (a notebook's mlflow.start_run) as
    # the model's run: then it gets the run id, and links the metrics its own (slower) way
    own = {"run_id": run_id, "step": step} if mlflow.active_run() is not None else {}
    try:
        with fluent_tracking_uri(client.tracking_uri), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pytorch.log_model(
                snapshot,
                name=MODEL_NAME,
                model_id=logged.model_id,  # its source run is set above: runs:/<run_id>/model finds it
                **own,
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
                serialization_format="pickle",  # the module itself, so load_model gives back a gmm.MixtureModel
            )
    finally:
        pytorch_log.setLevel(level)
    if own:
        return
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    if metrics:
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id) for m in metrics]
        client.log_batch(run_id, metrics=linked)


def load_model(run_id: str, tracking_uri: str | None = None, *, device: str | torch.device = "cpu") -> gmm.MixtureModel:
    """The fitted model a run logged (`mlflow.pytorch.load_model("runs:/<run_id>/model")`, with the URI resolved).

    Raises:
        ValueError: the run does not exist or logged no model (config log_model = false).
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = get_client(uri)
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id!r} in {uri}; check the run id and the tracking URI") from None
    if run.outputs is not None and run.outputs.model_outputs:
        import mlflow.pytorch

        from .tracking import fluent_tracking_uri

        with fluent_tracking_uri(uri):
            model = mlflow.pytorch.load_model(f"runs:/{run_id}/{MODEL_NAME}", map_location="cpu")
        return model.to(device)
    return _load_legacy_model(client, run_id, device)


def _load_legacy_model(client, run_id: str, device) -> gmm.MixtureModel:
    """A model logged as a `model/model.pt` state dict (runs made before the MLflow model)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, LEGACY_MODEL_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} logged no model; rerun it with log_model: true") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
    dtype = {"float32": torch.float32, "float64": torch.float64}[state["dtype"]]
    model = gmm.make_model(
        state["family"], state["num_components"], state["num_dims"], variance=state["variance"], dtype=dtype
    )
    model.load_state_dict(state["state_dict"])
    return model.to(device)
