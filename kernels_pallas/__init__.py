"""Attention kernels of DeepSeek-V4. Each op folder holds `reference.py`: the pure-JAX definition
(plain jnp, float32 accumulation, no Pallas import), which is also the model's default path."""
