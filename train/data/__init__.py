"""Data: webdataset shard streams (image or precomputed-latent shards, filters, aspect-ratio buckets),
image folders, Stage A's photo crops, the data module."""
from train.data.module import ImageTextData

__all__ = ["ImageTextData"]
