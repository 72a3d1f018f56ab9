"""Attention kernels the runtime's caches call: the CPU paged-attention decode op (paged_attention.py)."""
