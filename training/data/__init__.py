"""Pretraining data at scale: image sources and batches (``images``), streaming from shards (``streams``),
decoding with failures counted (``decode``) and webdataset shards and cached latents (``shards``)."""
