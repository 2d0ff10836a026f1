"""Prompt sources, model loading, activation extraction, token-embedding export and the
job runner. Imports ``warehouse`` only."""
