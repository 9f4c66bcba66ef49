"""Prefect wiring: the flow `marc`, one task per stage, the Ray task runner, MLflow runs. No algorithm."""
