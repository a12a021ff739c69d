"""The write protocol of a folder of shards: claim, atomic shards with done records, parts, and the manifest last."""
