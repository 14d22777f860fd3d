"""Dagster code location and training library of the BERT4Rec next-item recommender."""
