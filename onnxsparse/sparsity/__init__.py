"""Sparsity primitives: masks, allocations and statistics correction."""
