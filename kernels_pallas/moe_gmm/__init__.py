"""Grouped matmul of the routed experts: rows sorted by expert, one weight matrix per group."""
