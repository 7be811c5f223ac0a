"""Triton kernels for batched token-level reward scoring, each beside its torch reference."""
