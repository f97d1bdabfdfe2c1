"""One module per pipeline stage; each asset records its lineage in DuckDB."""
