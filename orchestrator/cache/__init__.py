"""The Parquet target cache: teacher targets computed once, shared by epochs, runs and trials."""
