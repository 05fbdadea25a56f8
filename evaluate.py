"""Evaluate a model under one or more routings, with timm's conventions.

The same as the ``attnprune-evaluate`` console script; the code is :mod:`attnprune.cli.evaluate`.
"""

from attnprune.cli.evaluate import run

if __name__ == "__main__":
    run()
