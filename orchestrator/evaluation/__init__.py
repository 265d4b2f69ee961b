"""k-NN and the linear probe, the end-of-run evaluation, ``simreg eval``, the exported student."""
