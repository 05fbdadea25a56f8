"""LightningModules: fine-tune and evaluate pruned ViTs across training paradigms.

- :class:`PrunedClassifier`: supervised and MAE fine-tuned models (cross-entropy, label smoothing, mixup/cutmix,
  layer-wise learning-rate decay), evaluation with micro-averaged top-1/top-5 and GFLOPs.
- :class:`DistillationClassifier`: DeiT hard-label distillation from a teacher.
- :class:`LinearProbe`, :class:`KNNClassifier`: DINO's evaluations of a frozen backbone.

Every module takes a :class:`~attnprune.lit.backbone.Backbone` (architecture, checkpoint, paradigm, routing, ...)
with its own training arguments, logs ``stage/name`` metrics (accuracy as a fraction: ``val/top1``, ``test/top1``, or
``test/<routing>/top1`` under evaluate.py) and stores a ``model_spec`` hyper-parameter so
:func:`attnprune.load_model` rebuilds the network from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_model_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from attnprune.errors import UserError, check_finite_outputs
from attnprune.flops import count_flops
from attnprune.io import load_model
from attnprune.lit.backbone import Backbone
from attnprune.lit.optim import WARMUP_COSINE, ConfigurableOptimizers, FromArgument, adamw_warmup_cosine
from attnprune.paradigms import knn_predict
from attnprune.routing import Routing
from attnprune.vit import forward_tokens, prune

__all__ = [
    "Backbone",
    "PrunedClassifier",
    "DistillationClassifier",
    "LinearProbe",
    "KNNClassifier",
]


def _accuracy(num_classes: int) -> MetricCollection:
    """Top-1 (and top-5) accuracy as fractions; logged as ``<stage>/top1``."""
    # Papers report micro-averaged accuracy (correct / total); torchmetrics defaults to macro.
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


SUPERVISED = Backbone()
DISTILLED = Backbone(model="deit_tiny_distilled_patch16_224", paradigm="distilled")
DINO = Backbone(model="auto")


class _PrunedModule(ConfigurableOptimizers, L.LightningModule):
    """What every module shares: building the network, its routing, evaluation metrics and the optimizer
    (:class:`~attnprune.lit.optim.ConfigurableOptimizers`)."""

    def __init__(self, backbone: Backbone | dict[str, Any], model_spec: dict[str, Any] | None) -> None:
        super().__init__()
        self.check_hyperparameters()  # the subclass saved its arguments: checked before the network is built
        self.backbone_config = Backbone.coerce(backbone)
        # Checkpoints and loggers hold the backbone as a plain mapping, which load_from_checkpoint hands back.
        self.save_hyperparameters({"backbone": self.backbone_config.as_dict()})
        # model_spec is set when restored from one of our checkpoints: Lightning loads the weights next.
        self.model, self.hparams["model_spec"] = self.backbone_config.build(model_spec)
        self.set_routing(Routing.parse(self.backbone_config.routing, len(self.model.blocks)))
        self.data_config = resolve_model_data_config(self.model)
        # Loaded models come in eval mode and Lightning keeps submodule modes at fit start: without this, dropout and
        # drop-path would be silently off during training.
        self.model.train()

    @property
    def backbone(self) -> nn.Module:
        """The (pruned) timm ViT."""
        return self.model

    @property
    def num_classes(self) -> int:
        """Classes the module predicts (those of its data's labels)."""
        return self.model.num_classes

    def set_routing(self, routing: Routing) -> None:
        """Prune the backbone with ``routing`` (an empty one restores the unpruned model)."""
        self.routing = routing
        prune(self.backbone, routing)

    def gflops(self) -> float:
        """GFLOPs per image of the backbone under its routing (:func:`attnprune.count_flops`)."""
        return count_flops(self.backbone, self.routing) / 1e9

    # the key prefix of test metrics: evaluate.py sets test/<routing> for each routing it tests
    test_key = "test"

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int = 0) -> None:
        images, labels = batch
        logits = self(images)
        if batch_idx == 0 and stage == "test":  # once per run: NaN logits would give a top-1, not an error
            source = f"model {self.backbone_config.checkpoint or self.backbone_config.model!r}"
            check_finite_outputs(logits, source, f"the first test batch under routing {self.routing.name!r}")
        key = "val" if stage == "val" else self.test_key
        self.log(f"{key}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=len(labels))
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, labels)
        named = {f"{key}/{name}": metric for name, metric in metrics.items()}
        self.log_dict(named, batch_size=len(labels), prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.log("val/gflops", self.gflops())

    def on_test_epoch_end(self) -> None:
        self.log(f"{self.test_key}/gflops", self.gflops())


class PrunedClassifier(_PrunedModule):
    """Fine-tune or evaluate a (pruned) timm classifier.

    Args:
        backbone: the network: architecture, checkpoint, paradigm (``supervised``, ``distilled``, ``mae`` for the
            average-pool readout; ``dino`` backbones go to :class:`LinearProbe`), classes, routing (None trains the
            unpruned model); default a supervised DeiT-T.
        lr: peak learning rate (AdamW's, and the default of any other optimizer given to the CLI).
        weight_decay: weight decay (none on biases, norms, position embeddings and prefix tokens).
        warmup_epochs: linear warm-up length, then cosine decay to zero (:class:`~attnprune.lit.optim.WarmupCosine`).
        layer_decay: layer-wise learning-rate decay: the learning rate falls by this factor per layer from the head
            down to the patch embedding (timm's groups; MAE fine-tuning uses 0.65-0.75); None to disable.
        label_smoothing: label smoothing of the cross-entropy.
        mixup: mixup alpha (0 disables).
        cutmix: cutmix alpha (0 disables).
        model_spec: set by checkpoints (rebuilds the network without ``checkpoint``); leave unset.
    """

    optimization = adamw_warmup_cosine()

    def __init__(
        self,
        backbone: Backbone = SUPERVISED,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        layer_decay: float | None = None,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        model_spec: dict[str, Any] | None = None,
    ) -> None:
        self.save_hyperparameters()
        super().__init__(backbone=backbone, model_spec=model_spec)
        classes = self.model.num_classes
        if classes == 0:
            raise UserError(
                "PrunedClassifier needs a classification head: set num_classes, or use LinearProbe / "
                "KNNClassifier for a DINO backbone"
            )
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=classes
            )
        self.train_loss = (
            SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        )
        self.val_metrics, self.test_metrics = _accuracy(classes), _accuracy(classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def compute_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.train_loss(self(images), labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        loss = self.compute_loss(images, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's parameter groups: no weight decay on 1-d parameters and the model's ``no_weight_decay()``; with
        ``layer_decay``, one group per layer with its ``lr_scale``."""
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        if self.hparams.layer_decay is None:
            return param_groups_weight_decay(self.model, weight_decay=weight_decay, no_weight_decay_list=skip)
        return param_groups_layer_decay(
            self.model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=self.hparams.layer_decay
        )


class DistillationClassifier(PrunedClassifier):
    """DeiT hard-label distillation: the class head learns the labels, the distillation head the teacher's argmax;
    at evaluation the two heads are averaged (timm's ``VisionTransformerDistilled`` in eval mode).

    Args:
        teacher: any timm hub name, weights file or Lightning checkpoint (frozen, fed the same images).
        teacher_architecture: the teacher's timm architecture, for a weights file that does not name its own.
        backbone: the student: a distilled timm architecture (``deit_*_distilled_*``); default a distilled DeiT-T
            with paradigm ``distilled``.
        **kwargs: see :class:`PrunedClassifier`.
    """

    def __init__(
        self, teacher: str, backbone: Backbone = DISTILLED, teacher_architecture: str | None = None, **kwargs: Any
    ) -> None:
        # `backbone` is a named argument so that LightningCLI's default is the distilled one, not PrunedClassifier's;
        # PrunedClassifier's save_hyperparameters already records `teacher` (Lightning collects the arguments of every
        # __init__ on the stack), and a second call here would erase `model_spec`.
        super().__init__(backbone=backbone, **kwargs)
        if not hasattr(self.model, "set_distilled_training"):
            raise UserError(f"{type(self.model).__name__} has no distillation token: use a deit_*_distilled_* model")
        if self.mixup is not None:
            raise UserError("hard-label distillation is implemented without mixup/cutmix")
        self.teacher = load_model(teacher, teacher_architecture).eval().requires_grad_(False)

    def on_train_start(self) -> None:
        # Lightning keeps every submodule's mode at fit start (models load in eval mode) and, after validation, only
        # restores the `training` flags: both would leave timm's distilled-training switch off.
        self.train()

    def on_validation_model_train(self) -> None:
        self.train()

    def on_train_end(self) -> None:
        self.model.set_distilled_training(False)

    def train(self, mode: bool = True) -> DistillationClassifier:
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (batch norm, dropout) while the student trains
        self.model.set_distilled_training(mode)
        return self

    def compute_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        logits, logits_dist = self.model(images)
        with torch.no_grad():
            teacher_labels = self.teacher(images).argmax(dim=-1)
        return 0.5 * self.train_loss(logits, labels) + 0.5 * F.cross_entropy(logits_dist, teacher_labels)


class _FrozenBackbone(_PrunedModule):
    """A frozen, pruned feature extractor reading the class token of the last ``n_last_blocks`` blocks."""

    def __init__(self, backbone: Backbone | dict[str, Any], n_last_blocks: int, model_spec: dict | None) -> None:
        backbone = Backbone.coerce(backbone)
        if backbone.num_classes:
            raise UserError(
                f"the DINO readouts read a headless backbone, but backbone.num_classes is {backbone.num_classes}: "
                "give the classes as the module's num_classes"
            )
        super().__init__(backbone=dataclasses.replace(backbone, num_classes=0), model_spec=model_spec)
        self.model.requires_grad_(False).eval()
        self.n_last_blocks = n_last_blocks
        if not self.model.has_class_token:
            raise UserError("the DINO readouts read the class token, but the backbone has none")
        self.feature_dim = self.model.embed_dim * n_last_blocks

    def train(self, mode: bool = True) -> _FrozenBackbone:
        super().train(mode)
        self.model.eval()
        return self

    @property
    def num_classes(self) -> int:
        """Classes of the readout (the backbone is headless)."""
        return self.hparams.num_classes

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Class tokens of the last ``n_last_blocks`` blocks, each normalised by the final norm, concatenated."""
        outputs: dict[int, Tensor] = {}
        forward_tokens(self.model, images, outputs)
        last = sorted(outputs)[-self.n_last_blocks :]
        return torch.cat([self.model.norm(outputs[i][:, 0]) for i in last], dim=-1)


class LinearProbe(_FrozenBackbone):
    """DINO linear evaluation: a linear classifier on the frozen (pruned) backbone's class token(s).

    Args:
        num_classes: classes of the linear classifier.
        backbone: the frozen backbone, headless (its ``num_classes`` left unset); default the architecture and
            paradigm its checkpoint names.
        n_last_blocks: concatenate the class tokens of the last n blocks (DINO uses 4 for ViT-S).
        lr: SGD learning rate (cosine decay to zero, no warm-up).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        model_spec: set by checkpoints; leave unset.
    """

    optimization = {
        "optimizer": {
            "class_path": "torch.optim.SGD",
            "init_args": {name: FromArgument(name) for name in ("lr", "momentum", "weight_decay")},
        },
        "lr_scheduler": {"class_path": WARMUP_COSINE, "init_args": {"warmup_epochs": 0.0}},
    }

    def __init__(
        self,
        num_classes: int,
        backbone: Backbone = DINO,
        n_last_blocks: int = 1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        model_spec: dict | None = None,
    ) -> None:
        self.save_hyperparameters()
        super().__init__(backbone=backbone, n_last_blocks=n_last_blocks, model_spec=model_spec)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.val_metrics, self.test_metrics = _accuracy(num_classes), _accuracy(num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The linear head's parameters, all decayed."""
        return [{"params": list(self.head.parameters())}]


class KNNClassifier(_FrozenBackbone):
    """DINO's weighted k-NN evaluation of a frozen (pruned) backbone; no training.

    ``trainer.validate`` / ``trainer.test`` first embed the datamodule's training split (evaluation transforms),
    then classify each evaluation image by its ``k`` nearest neighbours.

    Args:
        num_classes: classes.
        backbone: the frozen backbone, headless (its ``num_classes`` left unset), whose routing also embeds the memory
            bank; default the architecture and paradigm its checkpoint names.
        k: neighbours (DINO: 20).
        temperature: vote temperature (DINO: 0.07).
        model_spec: set by checkpoints; leave unset.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Backbone = DINO,
        k: int = 20,
        temperature: float = 0.07,
        model_spec: dict | None = None,
    ) -> None:
        self.save_hyperparameters()
        super().__init__(backbone=backbone, n_last_blocks=1, model_spec=model_spec)
        self.val_metrics, self.test_metrics = _accuracy(num_classes), _accuracy(num_classes)
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None

    def _build_bank(self) -> None:
        features, labels = [], []
        for images, targets in self.trainer.datamodule.bank_dataloader():
            features.append(self.features(images.to(self.device)))
            labels.append(targets.to(self.device))
        # Every process embeds the whole bank (not a shard): gathering shards padded by the sampler would duplicate
        # neighbours and change the vote.
        self.bank, self.bank_labels = torch.cat(features), torch.cat(labels)

    def on_validation_epoch_start(self) -> None:
        self._build_bank()

    def on_test_epoch_start(self) -> None:
        self._build_bank()

    def forward(self, images: Tensor) -> Tensor:
        votes = knn_predict(
            self.features(images),
            self.bank,
            self.bank_labels,
            self.hparams.num_classes,
            self.hparams.k,
            self.hparams.temperature,
        )
        return votes / votes.sum(dim=-1, keepdim=True)
