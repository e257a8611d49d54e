"""Predictions: the LiteRT model runtime (no Flask), the registry of installed versions, the
prediction service, its cache and prediction ids.
"""
