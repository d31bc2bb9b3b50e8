"""Benchmarks for optax_sam: cost (compiled FLOPs, wall time) and benefit
(accuracy)."""
