"""The data path: published shards -> planned rounds -> samples -> packed micro-batches."""
