"""Orchestration of SimReg on Ray: config, CLI, data pipeline, teacher pool, workers, tracking, export."""
