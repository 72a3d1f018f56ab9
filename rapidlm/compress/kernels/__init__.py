"""Matmul kernels for quantized weights, one module per format and device."""
