"""Dagster assets, one module per stage of the graph; thin wrappers over the plain library."""
