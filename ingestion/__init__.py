"""Ingestion: sources, the Segment-compatible tracking API, file and database connectors."""
