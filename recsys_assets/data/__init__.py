"""Plain data library (no Dagster): event sources, cleaning, vocabulary and tokenized sequences."""
