"""Ready workflows for single-cell tasks, each also a ``bamflow`` command.

- :func:`bamflow.presets.tag.tag`: FASTQ pair → unaligned BAM with raw barcode/UMI tags
- :func:`bamflow.presets.correct.correct`: cell barcode correction against a whitelist
- :func:`bamflow.presets.dedup.dedup`: UMI deduplication per cell (umi_tools dedup: its options, its reads)
- :func:`bamflow.presets.count.count`: gene × cell UMI counts (umi_tools count) → MTX, TSV, h5ad
- :func:`bamflow.presets.group.group`: UMI groups (umi_tools group): UG/BX tags and the group table
- :func:`bamflow.presets.group.count_tab`: molecules per gene from read id/gene lines (umi_tools count_tab)
- :func:`bamflow.presets.histogram.histogram`: reads per tag value (BamTagHistogram)
- :func:`bamflow.presets.qc.qc`: per-cell QC, knee plot, HTML report, JSON summary
"""
