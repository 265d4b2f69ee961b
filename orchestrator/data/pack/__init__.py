"""Packs: an ImageFolder tree pre-scanned and written as Parquet shards with a manifest."""
