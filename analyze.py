"""Measure attention selectivity layer by layer; write tables, plots and token maps.

The same as the ``attnprune-analyze`` console script; the code is :mod:`attnprune.cli.analyze`.
"""

from attnprune.cli.analyze import run

if __name__ == "__main__":
    run()
