"""The ``layerbase`` command: thin click groups that parse options, call a function, print."""
