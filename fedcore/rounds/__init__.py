"""Parties and rounds: the server party, client parties, the channels and messages between them, executors, sampling, training, checkpoints, costs and logging."""
