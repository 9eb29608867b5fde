"""Ready workflows for single-cell tasks (tagging, barcode correction, UMI
dedup, counting, histograms, QC) built on the engine. None yet."""
