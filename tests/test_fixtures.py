"""The shared fixtures give each test a real, private MLflow SQLite store."""

from __future__ import annotations

import mlflow


def test_mlflow_store_is_private_and_real(mlflow_store: str) -> None:
    assert mlflow_store.startswith("sqlite:////") and mlflow_store.endswith("mlflow.db")
    mlflow.set_experiment("fixture-check")
    with mlflow.start_run() as run:
        mlflow.log_param("modality", "cxr")
        mlflow.log_metric("cas", 0.5, step=3)
    got = mlflow.MlflowClient(mlflow_store).get_run(run.info.run_id)
    assert got.data.params == {"modality": "cxr"} and got.data.metrics == {"cas": 0.5}
