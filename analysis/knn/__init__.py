"""k-NN engines: exact top-k in memory (``blas``), exact and indexed search in SQL, the
per-layer vector indexes, and neighbour lookups."""
