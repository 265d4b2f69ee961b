"""YAML sweep definitions keyed by the config's dotted names (see ``simreg sweep``)."""
