"""Data: the shard format (:mod:`.shards`), the training loader (:mod:`.loading`) and image decoding."""
