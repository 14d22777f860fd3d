"""Real-time serving of the recommender (BentoML): bundle loading, ONNX Runtime inference, Feast
features, answer cache, popularity fallback, durable event log. Never imports torch or recsys_assets."""
