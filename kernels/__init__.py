"""Triton kernels behind ``backend="fused"`` (installed as ``l4lab.kernels``); filled by the kernels work."""
