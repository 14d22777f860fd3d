"""Evaluation library: ranking metrics, baselines, the leave-one-out protocol and the report.

Plain library (no Dagster import); the assets live in ``recsys_assets.assets.evaluation``.
"""
