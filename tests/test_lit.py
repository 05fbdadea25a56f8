"""The Lightning layer on real data (image folders through ``datasets``, Fashion-MNIST IDX files) and tiny ViTs."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from attnprune import Routing, count_flops, load_model, save_model
from attnprune.lit.backbone import Backbone
from attnprune.lit.data import (
    FASHION_MNIST_DIR,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    read_idx,
)
from attnprune.lit.modules import DistillationClassifier, KNNClassifier, LinearProbe, PrunedClassifier
from attnprune.paradigms import knn_predict
from tests.conftest import TINY_BACKBONE, make_image_folder, tiny_backbone

HEADLESS = {k: v for k, v in TINY_BACKBONE.items() if k != "num_classes"}  # the DINO readouts' backbone
ROUTING = {"rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5}, {"layer": 2, "r": 2, "reduce": "merge"}]}


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def fixed_batch(images: torch.Tensor, labels: torch.Tensor, steps: int) -> DataLoader:
    """The same batch ``steps`` times: a real Trainer run on one fixed batch."""
    return DataLoader(TensorDataset(images.repeat(steps, 1, 1, 1), labels.repeat(steps)), batch_size=len(images))


def first_test_batch(datamodule, module) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule.trainer = trainer()
    datamodule.trainer.strategy.connect(module)  # the transforms follow the module's data config
    datamodule.setup()
    return next(iter(datamodule.test_dataloader()))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def datamodule(folder, tmp_path):
    return ImageFolderDataModule(root=str(folder), batch_size=8, val_size=6, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------------- data
def test_image_folder_splits_and_rgb_conversion(datamodule, folder):
    datamodule.setup()
    assert {k: len(v) for k, v in datamodule.splits.items()} == {"train": 18, "validation": 6, "test": 12}
    assert datamodule.num_classes == 3
    images, labels = first_test_batch(datamodule, PrunedClassifier(tiny_backbone()))
    assert images.shape == (8, 3, 16, 16)  # grayscale and CMYK files converted to the model's RGB input
    assert labels.tolist() == [0] * 4 + [1] * 4
    # in the RGB and CMYK files (not the grayscale ones, every third) the class's colour channel dominates
    coloured = [0, 2, 3, 4, 6, 7]
    assert images[coloured].mean(dim=(2, 3)).argmax(dim=1).tolist() == labels[coloured].tolist()


def test_validation_carve_out_is_deterministic(folder, tmp_path):
    def validation_files(seed):
        dm = ImageFolderDataModule(root=str(folder), val_size=6, seed=seed, cache_dir=str(tmp_path))
        dm.prepare_splits()
        return sorted(np.asarray(image).sum() for image in dm.splits["validation"]["image"])

    assert validation_files(0) == validation_files(0)
    assert validation_files(0) != validation_files(1)


def test_fashion_mnist_reads_the_debian_idx_files():
    dm = FashionMNISTDataModule(
        data_config={"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "crop_pct": 1.0}
    )
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 55_000, "validation": 5_000, "test": 10_000}
    assert dm.num_classes == 10
    assert dm.splits["test"][0]["label"] == 9  # the first test image is an ankle boot
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (64, 1, 28, 28) and labels.shape == (64,)


def test_fashion_mnist_validation_is_a_documented_seeded_carve_out_read_in_order():
    """Seed 0 holds out training images ``np.random.default_rng(0).permutation(60_000)[:5_000]`` (``datasets``'
    ``train_test_split``): the first ones are 4013, 23840, 29603, ... The validation loader reads them in that order."""
    root = Path(FASHION_MNIST_DIR)
    pixels = read_idx(root / "train-images-idx3-ubyte.gz")
    labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    order = np.random.default_rng(0).permutation(60_000)
    assert order[:8].tolist() == [4013, 23840, 29603, 43011, 58703, 2290, 55984, 52800]
    dm = FashionMNISTDataModule(
        data_config={"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.25,), "crop_pct": 1.0}
    )
    dm.setup()
    validation = dm.splits["validation"]
    assert np.array_equal(np.asarray(validation[:8]["image"]), pixels[order[:8]])
    assert np.bincount(validation["label"], minlength=10).tolist() == [526, 510, 500, 464, 503, 520, 480, 517, 492, 488]
    assert np.array_equal(np.asarray(dm.splits["train"][:2]["image"]), pixels[order[5_000:5_002]])
    images, targets = next(iter(dm.val_dataloader()))  # not shuffled: the split's own order
    assert targets.tolist() == labels[order[:64]].tolist()
    torch.testing.assert_close(images[:, 0], torch.from_numpy((pixels[order[:64]] / 255.0 - 0.5) / 0.25).float())


def test_idx_reader_checks_the_header(tmp_path):
    good = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes(range(8)))
    assert read_idx(good).tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(bytes([1, 2, 8, 3]) + bytes(12))
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(bad)


def test_missing_data_says_how_to_provide_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*zalando-datasets"):
        FashionMNISTDataModule(root=str(tmp_path)).prepare_splits()
    with pytest.raises(FileNotFoundError, match=r"has no train/ subfolder"):
        ImageFolderDataModule(root=str(tmp_path)).prepare_splits()
    with pytest.raises(FileNotFoundError, match=r"local folder with train/.*val/"):
        ImageNetDataModule(source="ILSVRC/imagenet-1k", cache_dir=str(tmp_path)).prepare_splits()


# ---------------------------------------------------------------------------------------------------- modules
def test_micro_averaged_accuracy_by_hand():
    module = PrunedClassifier(tiny_backbone())
    # 4 of class 0, all right; 1 of class 1, wrong: micro 4/5 = 0.8 (macro would be (1 + 0) / 2 = 0.5)
    logits = torch.tensor([[5.0, 0, 0]] * 4 + [[5.0, 0, 0]])
    module.val_metrics.update(logits, torch.tensor([0, 0, 0, 0, 1]))
    assert module.val_metrics.compute()["top1"].item() == pytest.approx(0.8)


def _predictions(module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch of ``loader``, by hand (no metric objects)."""
    module.eval()
    with torch.no_grad():
        batches = [(module(images), labels) for images, labels in loader]
    return torch.cat([logits for logits, _ in batches]), torch.cat([labels for _, labels in batches])


def test_loss_falls_on_a_fixed_batch_and_validation_logs_its_values(datamodule):
    torch.manual_seed(0)
    module = PrunedClassifier(tiny_backbone(routing=ROUTING), lr=3e-3)
    images, labels = first_test_batch(datamodule, module)
    before = module.compute_loss(images, labels).item()
    trainer(max_epochs=1).fit(module, fixed_batch(images, labels, 25))
    after = module.compute_loss(images, labels).item()
    assert after < 0.5 * before
    metrics = trainer().validate(module, datamodule, verbose=False)[0]
    assert set(metrics) == {"val/loss", "val/top1", "val/gflops"}  # top-5 only with 5 classes or more
    logits, targets = _predictions(module, datamodule.val_dataloader())
    assert len(targets) == 6
    # the 6 validation images (colour-coded classes) after 25 steps on the test batch: 4 right
    assert metrics["val/top1"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item()) == 4 / 6
    assert metrics["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    # 16 px images in 4 px patches: 16 patch tokens, 8 after block 1 and 6 after block 2
    assert metrics["val/gflops"] == pytest.approx(count_flops(module.model, Routing.from_dict(ROUTING)) / 1e9)
    assert Routing.from_dict(ROUTING).token_counts(4, 16) == [16, 16, 8, 6, 6]


class _ModeSpy(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.modes = {m.training for m in module.model.modules()}


def test_network_trains_in_train_mode(datamodule):
    spy = _ModeSpy()
    module = PrunedClassifier(tiny_backbone(model_kwargs={**TINY_BACKBONE["model_kwargs"], "drop_path_rate": 0.1}))
    trainer(max_steps=1, callbacks=[spy], limit_val_batches=0).fit(module, datamodule)
    assert spy.modes == {True}  # drop-path active; a model loaded in eval mode would silently train without it


class _FirstStep(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.first = getattr(self, "first", trainer.global_step)


def test_checkpoint_reloads_and_resumes(datamodule, tmp_path):
    module = PrunedClassifier(tiny_backbone(routing=ROUTING))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer(max_steps=4, callbacks=[checkpoints], enable_checkpointing=True, limit_val_batches=0).fit(
        module, datamodule
    )
    last = tmp_path / "last.ckpt"
    assert last.is_file()
    x = torch.randn(2, 3, 16, 16)
    reloaded = PrunedClassifier.load_from_checkpoint(last)
    module.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x), module(x))
    assert reloaded.routing == module.routing
    # load_model gives the bare (unpruned) timm network with the same weights
    plain = load_model(last)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in module.model.state_dict().items())
    first = _FirstStep()
    resumed = trainer(
        max_steps=6, callbacks=[first], enable_checkpointing=True, limit_val_batches=0, default_root_dir=tmp_path
    )
    resumed.fit(PrunedClassifier(tiny_backbone(routing=ROUTING)), datamodule, ckpt_path=last)
    assert first.first == 4 and resumed.global_step == 6


def test_mae_paradigm_pools_and_decays_learning_rate_by_layer():
    module = PrunedClassifier(tiny_backbone(paradigm="mae", routing=ROUTING), layer_decay=0.5)
    assert module.model.global_pool == "avg" and not isinstance(module.model.fc_norm, torch.nn.Identity)
    module.trainer = trainer(max_steps=1)
    optimizer = module.configure_optimizers()["optimizer"]
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) == len(module.model.blocks) + 2 and scales[-1] == 1.0 and scales[0] == 0.5**5
    # each group trains at its scaled learning rate (torch's schedulers do not read lr_scale; timm's alone would)
    assert [group["lr"] for group in optimizer.param_groups] == [5e-4 * g["lr_scale"] for g in optimizer.param_groups]
    weight = module.model.patch_embed.proj.weight
    patch_embedding = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    assert patch_embedding["lr"] == pytest.approx(5e-4 * 0.5**5)


def test_distillation_learns_the_teachers_labels(datamodule, tmp_path):
    torch.manual_seed(0)
    teacher = PrunedClassifier(tiny_backbone()).model
    teacher_path = save_model(
        teacher, tmp_path / "teacher.safetensors", "vit_tiny_patch16_224", model_kwargs=TINY_BACKBONE["model_kwargs"]
    )
    student = tiny_backbone(model="deit_tiny_distilled_patch16_224", paradigm="distilled", routing=ROUTING)
    module = DistillationClassifier(teacher=str(teacher_path), backbone=student, lr=3e-3)
    images, labels = first_test_batch(datamodule, module)
    teacher_labels = load_model(teacher_path)(images).argmax(-1)
    module.train()
    before = module.compute_loss(images, labels).item()
    trainer(max_epochs=1).fit(module, fixed_batch(images, labels, 25))
    module.train()
    after = module.compute_loss(images, labels).item()
    assert after < 0.5 * before
    _, distillation_logits = module.model(images)
    assert (distillation_logits.argmax(-1) == teacher_labels).float().mean() >= 0.9
    module.eval()
    assert module(images).shape == (len(images), 3)  # eval: the two heads averaged into one prediction
    assert all(not p.requires_grad for p in module.teacher.parameters()) and not module.teacher.training
    assert module.hparams["teacher"] == str(teacher_path)
    assert module.hparams["model_spec"]["paradigm"] == "distilled"  # what checkpoints/ exports record
    assert module.hparams["model_spec"]["architecture"] == "deit_tiny_distilled_patch16_224"
    with pytest.raises(ValueError, match="no distillation token"):
        DistillationClassifier(teacher=str(teacher_path), backbone=tiny_backbone())


def test_backbone_mapping_in_yaml_trains_and_its_checkpoint_restores_the_module(folder, tmp_path):
    """The backbone as a nested mapping in YAML and on the command line: fields not given keep the module's default
    (the distilled architecture and paradigm), and the checkpoint restores the module and rebuilds the network."""
    from attnprune.cli import lightning_parser_kwargs
    from attnprune.lit.cli import AttnpruneCLI

    teacher = save_model(
        PrunedClassifier(tiny_backbone()).model,
        tmp_path / "teacher.safetensors",
        "vit_tiny_patch16_224",
        model_kwargs=TINY_BACKBONE["model_kwargs"],
    )
    given = {"model_kwargs": TINY_BACKBONE["model_kwargs"], "pretrained_cfg": TINY_BACKBONE["pretrained_cfg"]}
    config = {
        "model": {
            "class_path": "attnprune.lit.modules.DistillationClassifier",
            "init_args": {"teacher": str(teacher), "backbone": {**given, "routing": ROUTING}, "lr": 1e-3},
        },
        "data": {
            "class_path": "attnprune.lit.data.ImageFolderDataModule",
            "init_args": {"root": str(folder), "batch_size": 8, "val_size": 6, "cache_dir": str(tmp_path / "hf")},
        },
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "max_steps": 2,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),  # the saved run config goes there, not into the working directory
        },
        "checkpoint": {"dirpath": str(tmp_path / "checkpoints")},
    }
    path = tmp_path / "distilled.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), "--model.init_args.backbone.num_classes", "3"]
    module = AttnpruneCLI(args=args, parser_kwargs=lightning_parser_kwargs()).model
    expected = Backbone(model="deit_tiny_distilled_patch16_224", paradigm="distilled", num_classes=3, routing=ROUTING)
    assert module.backbone_config == dataclasses.replace(expected, **given)
    last = tmp_path / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["backbone"] == module.backbone_config.as_dict()  # a plain mapping, not a pickled object
    assert hparams["model_spec"]["architecture"] == "deit_tiny_distilled_patch16_224"
    restored = DistillationClassifier.load_from_checkpoint(last).eval()
    module.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored(x), module(x))
    assert restored.backbone_config == module.backbone_config and restored.routing == module.routing
    plain = load_model(last)  # the network alone, unpruned, from the checkpoint's model_spec
    assert plain.num_classes == 3 and all(
        torch.equal(plain.state_dict()[k], v) for k, v in module.model.state_dict().items()
    )


def test_backbone_refuses_what_is_not_one_of_its_fields():
    assert Backbone.coerce({"model": "auto", "paradigm": "dino"}) == Backbone(model="auto", paradigm="dino")
    with pytest.raises(TypeError, match=r"backbone has no field arch \(its fields: model, checkpoint, paradigm,"):
        PrunedClassifier({"arch": "vit_tiny_patch16_224"})
    with pytest.raises(TypeError, match="backbone must be a Backbone or a mapping of its fields, got str"):
        PrunedClassifier("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="headless backbone, but backbone.num_classes is 3"):
        LinearProbe(3, tiny_backbone(paradigm="dino"))


def test_linear_probe_trains_only_its_head(datamodule):
    probe = LinearProbe(3, Backbone(**HEADLESS, paradigm="dino", routing=ROUTING), n_last_blocks=4, lr=0.1)
    assert probe.head.in_features == 4 * 32
    backbone = {k: v.clone() for k, v in probe.model.state_dict().items()}
    head = probe.head.weight.clone()
    trainer(max_steps=3, limit_val_batches=1).fit(probe, datamodule)
    assert all(torch.equal(v, probe.model.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(head, probe.head.weight)


def test_knn_predict_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    votes = knn_predict(torch.tensor([[1.0, 0.05]]), bank, torch.tensor([0, 0, 1]), num_classes=2, k=2)
    assert votes.argmax().item() == 0 and votes[0, 1] == 0  # both nearest neighbours are class 0


def _features(module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        batches = [(module.features(images), labels) for images, labels in loader]
    return torch.cat([f for f, _ in batches]), torch.cat([labels for _, labels in batches])


def test_knn_classifier_validates(datamodule):
    torch.manual_seed(0)
    knn = KNNClassifier(3, Backbone(**HEADLESS, paradigm="dino", routing=ROUTING), k=3)
    metrics = trainer().validate(knn, datamodule, verbose=False)[0]
    assert knn.bank.shape == (18, 32)
    assert set(metrics) == {"val/loss", "val/top1", "val/gflops"}
    # by hand: the 3 nearest of the 18 training images' features vote (classes are colour-coded, so all 6 are right)
    bank, bank_labels = _features(knn, datamodule.bank_dataloader())
    features, targets = _features(knn, datamodule.val_dataloader())
    votes = knn_predict(features, bank, bank_labels, num_classes=3, k=3, temperature=0.07)
    assert metrics["val/top1"] == pytest.approx((votes.argmax(-1) == targets).float().mean().item()) == 1.0


# -------------------------------------------------------------------------------------------------- bad input
def test_unknown_paradigm():
    with pytest.raises(ValueError, match=r"unknown paradigm 'clip' \(known: supervised, distilled, dino, mae\)"):
        PrunedClassifier(tiny_backbone(paradigm="clip"))


def test_routing_that_does_not_fit_the_model():
    with pytest.raises(ValueError, match=r"routing rule 0: field 'layer' is 9 but the model has 4 blocks"):
        PrunedClassifier(tiny_backbone(routing={"rules": [{"layer": 9, "score": "std", "keep": 0.5}]}))


def test_a_module_reads_routing_presets_as_every_entry_point_does():
    module = PrunedClassifier(tiny_backbone(routing="evit:keep=0.5"))  # the tiny backbone has 4 blocks
    assert module.routing == Routing.parse("evit:keep=0.5", 4) == Routing.evit(0.5, (1, 2, 3))
    assert module.backbone.routing is module.routing


def test_checkpoint_of_another_architecture(tmp_path):
    small = PrunedClassifier(tiny_backbone()).model
    path = tmp_path / "weights.pth"
    torch.save(small.state_dict(), path)
    wide = {**TINY_BACKBONE["model_kwargs"], "embed_dim": 64}
    with pytest.raises(
        ValueError, match=r"weights.pth does not fit architecture 'vit_tiny_patch16_224'.*shape mismatch"
    ):
        PrunedClassifier(tiny_backbone(model_kwargs=wide, checkpoint=str(path)))
    with pytest.raises(ValueError, match="carries no architecture"):
        load_model(path)
    saved = save_model(
        small, tmp_path / "w.safetensors", "vit_tiny_patch16_224", model_kwargs=TINY_BACKBONE["model_kwargs"]
    )
    with pytest.raises(ValueError, match=r"holds a 'vit_tiny_patch16_224' but architecture 'deit_small_patch16_224'"):
        load_model(saved, architecture="deit_small_patch16_224")


def test_load_model_round_trip_and_offline_hub_error(tmp_path):
    model = PrunedClassifier(tiny_backbone()).model
    path = save_model(
        model, tmp_path / "m.safetensors", "vit_tiny_patch16_224", model_kwargs=TINY_BACKBONE["model_kwargs"]
    )
    loaded = load_model(path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 16, 16) and not loaded.training
    with pytest.raises(OSError, match=r"Offline, pass a local file instead"):
        load_model("deit_tiny_patch16_224.fb_in1k")
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_mixup_cutmix_train_on_soft_targets(datamodule):
    module = PrunedClassifier(tiny_backbone(routing=ROUTING), mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    images, labels = first_test_batch(datamodule, module)
    mixed, soft = module.mixup(images, labels)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(-1), torch.ones(8))
    assert (soft > 0).sum() > 8  # labels were mixed and smoothed, not one-hot
    trainer(max_epochs=1).fit(module, fixed_batch(images, labels, 2))
    assert torch.isfinite(module.compute_loss(mixed, soft))


def test_last_checkpoint_holds_the_last_epoch_when_the_metric_does_not_improve(folder, tmp_path):
    """Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint is saved; train.py's checkpoint callback
    rewrites it every epoch, so resuming never goes back. With lr 0, val/top1 cannot improve after epoch 0."""
    from attnprune.cli import lightning_parser_kwargs
    from attnprune.lit.cli import AttnpruneCLI

    weights = save_model(
        PrunedClassifier(tiny_backbone()).model,
        tmp_path / "tiny.safetensors",
        "vit_tiny_patch16_224",
        model_kwargs=TINY_BACKBONE["model_kwargs"],
    )
    checkpoints = tmp_path / "checkpoints"
    args = {
        "model.class_path": "attnprune.lit.modules.PrunedClassifier",
        "model.init_args.backbone.model": "auto",
        "model.init_args.backbone.checkpoint": str(weights),
        "model.init_args.lr": "0.0",
        "data.class_path": "attnprune.lit.data.ImageFolderDataModule",
        "data.init_args.root": str(folder),
        "data.init_args.cache_dir": str(tmp_path / "hf"),
        "data.init_args.batch_size": "8",
        "trainer.accelerator": "cpu",
        "trainer.logger": "false",
        "trainer.max_epochs": "2",
        "trainer.enable_progress_bar": "false",
        "trainer.default_root_dir": str(tmp_path),
        "checkpoint.dirpath": str(checkpoints),
        "checkpoint.monitor": "val/top1",
        "checkpoint.mode": "max",
        "checkpoint.filename": "best",
    }
    cli = AttnpruneCLI(
        args=["fit", *[item for key, value in args.items() for item in (f"--{key}", value)]],
        parser_kwargs=lightning_parser_kwargs(),
    )
    steps_per_epoch = cli.trainer.global_step // 2
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == 0 and best["global_step"] == steps_per_epoch  # the metric did not improve in epoch 1
    assert last["epoch"] == 1 and last["global_step"] == 2 * steps_per_epoch
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
