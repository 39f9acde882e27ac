"""Experiments and the CLI: configs that build the object graph, runs, private tuning, the researcher's path (SimpleTask)."""
