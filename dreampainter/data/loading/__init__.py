"""The training loader: shards -> decoded, augmented, collated batches split by rank and worker."""
