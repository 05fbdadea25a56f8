"""Train or fine-tune a (pruned) ViT from a YAML config.

The same as the ``attnprune-train`` console script; the code is :mod:`attnprune.cli.train`.
"""

from attnprune.cli.train import run

if __name__ == "__main__":
    run()
