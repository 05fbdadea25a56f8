"""Search the best static routing under a FLOPs budget on validation data.

The same as the ``attnprune-search`` console script; the code is :mod:`attnprune.cli.search`.
"""

from attnprune.cli.search import run

if __name__ == "__main__":
    run()
