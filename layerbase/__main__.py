"""``python -m layerbase``: the ``layerbase`` command."""

from layerbase.cli.main import main

if __name__ == "__main__":
    main()
