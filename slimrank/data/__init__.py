"""Datasets (MovieLens-100k, user logs, synthetic catalogs), id maps, splits and feature tables."""
