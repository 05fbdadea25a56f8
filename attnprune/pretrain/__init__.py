"""The small self-supervised objectives that produce the offline DINO and MAE paradigm models, in plain torch.

- :mod:`~attnprune.pretrain.dino`: DINO's head, student/teacher network, loss, centring and EMA update.
- :mod:`~attnprune.pretrain.mae`: the masked autoencoder around a timm ViT encoder.
- :mod:`~attnprune.pretrain.transforms`: DINO's multi-crop augmentation.
- :mod:`~attnprune.pretrain.backbone`: the ViT they train and the file it is handed over as.

The LightningModules that train them are :class:`attnprune.lit.pretraining.DINOPretraining` and
:class:`attnprune.lit.pretraining.MAEPretraining`.
"""

from attnprune.pretrain.backbone import create_vit, export_backbone
from attnprune.pretrain.dino import DINOHead, DINONetwork, dino_loss, dino_teacher_targets, ema_update, update_center
from attnprune.pretrain.mae import MaskedAutoencoder, finetuning_state_dict, sincos_pos_embed_2d
from attnprune.pretrain.transforms import MultiCropTransform

__all__ = [
    "DINOHead",
    "DINONetwork",
    "MaskedAutoencoder",
    "MultiCropTransform",
    "create_vit",
    "dino_loss",
    "dino_teacher_targets",
    "ema_update",
    "export_backbone",
    "finetuning_state_dict",
    "sincos_pos_embed_2d",
    "update_center",
]
