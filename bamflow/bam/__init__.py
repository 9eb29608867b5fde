"""The BAM layer: the BAM stages on the engine (decode, distribute, collect,
encode over raw record streams), BGZF, headers, the per-read API
(map_reads, map_reduce) and shard, split and filter."""
