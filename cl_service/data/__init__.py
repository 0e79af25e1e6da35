"""Task streams as Arrow shards: the sample schema, shard writers/readers, ingest/export, built-in benchmarks."""

from cl_service.data.schema import SCHEMA_VERSION, SAMPLE_SCHEMA, Sample

__all__ = ["SCHEMA_VERSION", "SAMPLE_SCHEMA", "Sample"]
