"""Cython kernels: the per-record hot loops of bamflow's stages."""
