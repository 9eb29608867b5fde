# cython: language_level=3
"""bamflow.Record: a zero-copy view of one BAM record (being written)."""
