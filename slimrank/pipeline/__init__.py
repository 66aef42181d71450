"""Offline jobs that chain data, retrieval, ranking and compression into a bundle."""
