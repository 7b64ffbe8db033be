"""The data library: webdataset shard sets, aspect-ratio buckets, image folders and the embedded OpenMoji /
scikit-image set.

Imports no other package of this project."""
