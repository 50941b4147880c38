"""Sub-commands of the ``dreampainter`` console script (argument parsing only; work is in the library)."""
