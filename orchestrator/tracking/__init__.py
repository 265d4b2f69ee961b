"""Experiment tracking (MLflow), secret redaction and the reaper of dead drivers' runs."""
