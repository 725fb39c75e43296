"""Image data: the embedded synthetic dataset, image sources, shard writing and the two shard readers."""
