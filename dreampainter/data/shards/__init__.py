"""The DreamEcom shard format: member names and records, writing, indexing, validating and reading shards."""
