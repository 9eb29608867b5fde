"""Ready workflows for single-cell tasks, each also a ``bamflow`` command.

- :func:`bamflow.presets.tag.tag`: FASTQ pair → unaligned BAM with raw barcode/UMI tags
- :func:`bamflow.presets.correct.correct`: cell barcode correction against a whitelist
- :func:`bamflow.presets.histogram.histogram`: reads per tag value (BamTagHistogram)
"""
