"""Image data: the embedded synthetic dataset, image sources, shard writing and shard readers."""
