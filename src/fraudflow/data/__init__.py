"""Transaction data: the canonical schema, ingest with validation, the simulator, time splits."""
