"""Token-embedding geometry across models (Lee et al. 2025): global and local."""
