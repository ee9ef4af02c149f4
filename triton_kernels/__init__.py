"""Triton kernels of ltcl_fused, installed as ``ltcl_fused.triton_kernels`` (never a top-level package)."""
