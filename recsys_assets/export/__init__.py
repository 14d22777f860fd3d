"""Export library: ONNX (parity-checked), TensorRT (GPU), model bundles (write, gate, promote, roll back).

Plain library (no Dagster import); the assets live in ``recsys_assets.assets.export``.
"""
