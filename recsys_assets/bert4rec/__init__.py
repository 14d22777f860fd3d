"""BERT4Rec model and training library (plain PyTorch, no Dagster)."""

from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, load_model, save_model

__all__ = ["BERT4Rec", "BERT4RecConfig", "load_model", "save_model"]
