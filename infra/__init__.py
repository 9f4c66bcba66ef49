"""The local stack (Prefect, MLflow, Ray on 127.0.0.1), presets and state paths. Knows nothing of stages."""
