# cython: language_level=3
"""UMI kernels of the dedup, count and group presets (being written)."""
