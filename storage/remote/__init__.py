"""Where shards live: local folders and fsspec URLs behind one interface, the mirror, and the local download cache."""
