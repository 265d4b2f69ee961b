"""One distillation run: the driver, Ray Train wiring, the worker's epoch loop, checkpoints."""
