"""Labelled image sources, augmented views and packs of a user's images.

Importing this package fills the data-source registry (``data/sources.py``): each built-in source module
registers itself. A new source module is imported here too.
"""
from simreg.orchestrator.data import fashion_mnist, image_folder, packed, synthetic  # noqa: F401  (register the sources)
