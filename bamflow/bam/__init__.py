"""BAM stages: decode, distribute and collect binary records, encode."""
