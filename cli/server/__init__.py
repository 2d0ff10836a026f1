"""``layerbase serve``: the HTTP API over the Python API (``app``)."""
