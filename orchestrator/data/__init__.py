"""Labelled image sources, augmented views and packs of a user's images."""
