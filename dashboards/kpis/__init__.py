"""Metric declarations, one module per package whose data has KPIs."""
