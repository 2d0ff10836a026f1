"""Analyses over the warehouse: k-NN engines, mutual k-NN affinity, statistics,
neighbour lookups. Imports ``warehouse``, and ``ingest`` only to run a model."""
