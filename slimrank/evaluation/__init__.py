"""Ranking metrics and the evaluation protocol every stage is measured with."""
