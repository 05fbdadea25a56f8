"""Train or fine-tune a (pruned) ViT: a LightningCLI entry point configured by YAML under configs/.

python train.py fit --config configs/fashion_mnist/supervised.yaml
python train.py fit --config configs/fashion_mnist/supervised.yaml --ckpt_path runs/.../last.ckpt   # resume
python train.py fit --config ... --model.routing configs/routing/layerwise_example.yaml             # fine-tune pruned
"""

from attnprune.lit.cli import AttnpruneCLI


def main() -> None:
    AttnpruneCLI()


if __name__ == "__main__":
    main()
