"""Data: the embedded OpenMoji set, held-out photos, shard and folder loaders, the data module."""
from train.data.module import ImageTextData

__all__ = ["ImageTextData"]
