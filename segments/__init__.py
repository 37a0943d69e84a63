"""Segments: computed attributes and the audience builder."""
