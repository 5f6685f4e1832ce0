"""Fused kernels of ibtpo_fast (installed as `ibtpo_fast.kernels`)."""
