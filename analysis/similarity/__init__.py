"""Similarity of layer pairs across models: affinity matrices (mutual k-NN) and their statistics."""
