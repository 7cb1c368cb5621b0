"""Video-text data: sharded parquet (one schema for synthetic and real clips) and Ray Data streaming."""

from .shards import SCHEMA, read_manifest, shard_name, write_shard
from .stream import dataset, decode_rows

__all__ = ["SCHEMA", "dataset", "decode_rows", "read_manifest", "shard_name", "write_shard"]
