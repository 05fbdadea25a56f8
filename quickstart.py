"""The quickstart: a shipped model pruned by every baseline at matched FLOPs.

The same as the ``attnprune-quickstart`` console script; the code is :mod:`attnprune.cli.quickstart`.
"""

from attnprune.cli.quickstart import run

if __name__ == "__main__":
    run()
