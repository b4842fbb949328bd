"""Ahead-of-time compilation for GPUs and TPUs on a CPU host (docs/aot.md)."""
