"""Ranker server: HTTP ranking with early embedding lookups, dynamic batching, versions."""
