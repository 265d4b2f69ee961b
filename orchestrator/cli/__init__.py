"""The ``simreg`` command line."""
