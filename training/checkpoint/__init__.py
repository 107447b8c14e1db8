"""Checkpoints: DCP step folders (local or object store) and what a resume may change."""
