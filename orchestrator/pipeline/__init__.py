"""The Ray Data pipeline: views of each block, every teacher's targets from run-long actors."""
