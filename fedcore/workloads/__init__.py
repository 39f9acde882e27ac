"""Workloads: the Task protocol, real data sets, partitions, and the recommendation and review cases."""
