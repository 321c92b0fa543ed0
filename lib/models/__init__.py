"""Neural networks: the DeepSDF decoder and the single-view image encoder."""
