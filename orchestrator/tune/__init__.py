"""Sweeps with Ray Tune: search spaces applied to the config, trials, MLflow child runs, comparison."""
