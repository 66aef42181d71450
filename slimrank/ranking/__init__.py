"""Teacher and student rankers, candidate features and the serving-time scorer."""
