"""Train or fine-tune a (pruned) ViT: a LightningCLI entry point configured by YAML under configs/.

python train.py fit --config configs/fashion_mnist/supervised.yaml
python train.py fit --config configs/fashion_mnist/supervised.yaml --ckpt_path runs/.../last.ckpt   # resume
python train.py fit --config ... --model.init_args.backbone.routing tome:r=2                        # fine-tune pruned

A bad option, file or routing ends with exit status 2 and one line on stderr (``--debug`` or ``ATTNPRUNE_DEBUG=1``
for a traceback).
"""

from attnprune.cli import lightning_parser_kwargs, run_cli
from attnprune.lit.cli import AttnpruneCLI


def main(args: list[str] | None = None) -> None:
    AttnpruneCLI(args=args, parser_kwargs=lightning_parser_kwargs())


def run() -> None:
    """The ``attnprune-train`` console script: :func:`main` on ``sys.argv``, one line and exit status 2 on a user
    error."""
    run_cli(main)
