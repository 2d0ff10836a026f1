"""Steering vectors, their evaluation, and their transfer between models (Emb2Emb)."""
