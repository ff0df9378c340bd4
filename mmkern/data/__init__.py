"""Data helpers for multimodal training."""

from mmkern.data.feature_store import QuantizedFeatureStore

__all__ = ["QuantizedFeatureStore"]
