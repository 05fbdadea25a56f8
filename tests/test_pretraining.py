"""DINO and MAE pretraining objectives, the multi-crop transform and the hand-over of the pretrained backbones to
the downstream modules, on tiny ViTs with a real Lightning Trainer."""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from PIL import Image
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from attnprune import count_flops, load_model
from attnprune.lit.backbone import Backbone
from attnprune.lit.callbacks import FlopsModelSummary
from attnprune.lit.data import ImageFolderDataModule, collate_images
from attnprune.lit.modules import LinearProbe, PrunedClassifier
from attnprune.lit.pretraining import DINOPretraining, MAEPretraining
from attnprune.pretrain import MultiCropTransform
from tests.conftest import make_image_folder

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, in_chans=1)  # 64 patch tokens
CFG = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.4], "crop_pct": 1.0, "interpolation": "bicubic"}
BATCH = 8


class _Repeat(Dataset):
    """The same batch, ``length`` times (use with ``batch_size=None``)."""

    def __init__(self, batch: object, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> object:
        return self.batch


class _RecordLoss(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _fit(module: L.LightningModule, batch: object, steps: int) -> list[float]:
    """Train ``module`` for ``steps`` optimizer steps on one repeated batch; return the per-step losses."""
    record = _RecordLoss()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, DataLoader(_Repeat(batch, steps), batch_size=None))
    assert len(record.losses) == steps
    return record.losses


def _plain_vit() -> torch.nn.Module:
    return timm.create_model(ARCH, num_classes=0, **TINY).eval()


def _smooth_images(seed: int = 0) -> Tensor:
    """Low-frequency grayscale images (random sums of sinusoids): neighbouring patches predict each other."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 2 * math.pi, 32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = torch.randint(1, 3, (BATCH, 3, 2), generator=g).float()
    phase = torch.rand(BATCH, 3, 1, 1, generator=g) * 2 * math.pi
    waves = torch.sin(freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy + phase)
    return waves.sum(dim=1, keepdim=True)


def _dino_batch(seed: int = 0) -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(BATCH, 1, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(BATCH, 1, 16, 16, generator=g) for _ in range(2)]
    return crops, torch.zeros(BATCH, dtype=torch.long)


def _dino(**kwargs) -> DINOPretraining:
    torch.manual_seed(0)
    defaults = dict(out_dim=64, head_hidden=64, head_bottleneck=16, lr=1e-3, warmup_epochs=0)
    return DINOPretraining(ARCH, TINY, **{**defaults, **kwargs})


def _mae(**kwargs) -> MAEPretraining:
    torch.manual_seed(0)
    defaults = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, lr=1e-3, warmup_epochs=0)
    return MAEPretraining(ARCH, TINY, **{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Multi-crop transform
# ---------------------------------------------------------------------------------------------------------------


def test_multicrop_gives_global_then_local_crops_and_collates():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    transform = MultiCropTransform(global_size=32, local_size=16, num_local=3)
    crops = transform(image)
    assert [tuple(c.shape) for c in crops] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3  # an 'L' image stays 1-channel
    assert all(c.dtype == torch.float32 and c.min() >= -1 and c.max() <= 1 for c in crops)  # normalised by 0.5/0.5
    assert not torch.equal(crops[0], crops[1])  # two different random global crops

    assert [c.shape[0] for c in transform(image.convert("CMYK"))] == [3] * 5  # any other mode becomes RGB
    rgb = MultiCropTransform(24, 8, num_local=1, grayscale=False)(image)
    assert [tuple(c.shape) for c in rgb] == [(3, 24, 24)] * 2 + [(3, 8, 8)]
    gray = MultiCropTransform(24, 8, num_local=1, grayscale=True)(image.convert("RGB"))
    assert [c.shape[0] for c in gray] == [1] * 3

    views, labels = collate_images([{"image": transform(image), "label": label} for label in range(4)])
    assert [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 3
    assert labels.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("channels", [1, 3])
def test_datamodule_with_multicrop_train_transform_yields_views_in_the_model_mode(tmp_path, channels):
    # The DataModule converts each image (RGB, L and CMYK files here) to the model's mode before the transform.
    data = ImageFolderDataModule(
        str(make_image_folder(tmp_path / "data", train_per_class=2, test_per_class=1)),
        cache_dir=str(tmp_path / "hf-cache"),
        batch_size=4,
        val_size=2,
        data_config={"input_size": (channels, 16, 16), "mean": (0.5,) * channels, "std": (0.5,) * channels},
        train_transform=MultiCropTransform(global_size=16, local_size=8, num_local=2),
    )
    data.setup("fit")
    views, labels = next(iter(data.train_dataloader()))
    assert [tuple(v.shape) for v in views] == [(4, channels, 16, 16)] * 2 + [(4, channels, 8, 8)] * 2
    assert labels.shape == (4,)
    images, _ = next(iter(data.val_dataloader()))  # evaluation keeps the single-image transform
    assert images.shape == (2, channels, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# DINO
# ---------------------------------------------------------------------------------------------------------------


def test_dino_loss_falls_teacher_has_no_grads_and_backbone_loads_strictly(tmp_path):
    # With a moving center the loss on a fixed batch is not monotone: centering the near-identical outputs of a
    # random teacher makes its targets flatter, which raises the cross-entropy (it includes the teacher's entropy).
    # A frozen center (momentum 1) leaves a slowly moving teacher, which the student must learn to match.
    module = _dino(center_momentum=1.0, backbone_path=str(tmp_path / "dino" / "backbone.safetensors"))
    losses = _fit(module, _dino_batch(), steps=20)
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses

    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())

    plain = _plain_vit()
    plain.load_state_dict(module.backbone_state_dict(), strict=True)
    images = _dino_batch(seed=1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(plain(images), module.teacher.backbone.eval()(images))
        assert not torch.allclose(plain(images), module.student.backbone.eval()(images))  # the teacher, not the student
        torch.testing.assert_close(load_model(tmp_path / "dino" / "backbone.safetensors")(images), plain(images))


def test_dino_backbone_file_loads_alone_and_feeds_the_linear_probe(tmp_path):
    module = _dino(pretrained_cfg=CFG)
    assert tuple(module.data_config["input_size"]) == (1, 32, 32) and tuple(module.data_config["mean"]) == (0.3,)
    path = module.save_backbone(tmp_path / "backbone.safetensors")

    loaded = load_model(path)
    assert not loaded.dynamic_img_size and loaded.num_classes == 0
    spec = loaded.attnprune_spec
    assert spec["paradigm"] == "dino" and "dynamic_img_size" not in spec["model_kwargs"]
    assert tuple(loaded.pretrained_cfg["input_size"]) == (1, 32, 32) and tuple(loaded.pretrained_cfg["std"]) == (0.4,)
    _plain_vit().load_state_dict(load_file(path), strict=True)  # a plain fixed-size model takes it as is

    images = _dino_batch(seed=1)[0][0]
    teacher = module.teacher.backbone.eval()
    probe = LinearProbe(10, Backbone(model="auto", checkpoint=str(path), paradigm="dino"), n_last_blocks=1)
    with torch.no_grad():
        assert probe(images).shape == (BATCH, 10)
        torch.testing.assert_close(probe.features(images), teacher(images))  # the teacher's normed class token
    assert tuple(probe.data_config["input_size"]) == (1, 32, 32)
    probe2 = LinearProbe(10, Backbone(model="auto", checkpoint=str(path), paradigm="dino"), n_last_blocks=2)
    assert probe2(images).shape == (BATCH, 10) and probe2.feature_dim == 2 * 32


def test_dino_teacher_is_ema_of_stepped_student_and_center_moves_by_one_minus_momentum():
    module = _dino(ema_momentum=0.9, center_momentum=0.8)
    batch = _dino_batch()
    teacher0, student0 = copy.deepcopy(module.teacher), copy.deepcopy(module.student)
    with torch.no_grad():
        expected_center = 0.2 * teacher0(batch[0][:2]).mean(dim=0, keepdim=True)  # the center starts at zero
    _fit(module, batch, steps=1)

    moved = zip(student0.parameters(), module.student.parameters(), strict=True)
    assert any(not torch.equal(s0, s1) for s0, s1 in moved)
    pairs = zip(teacher0.parameters(), module.teacher.parameters(), module.student.parameters(), strict=True)
    for t0, t1, s1 in pairs:  # EMA with the student *after* its step (teacher0 == student0 at init)
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1)
    torch.testing.assert_close(module.center, expected_center)


def test_dino_rejects_a_batch_without_two_global_crops():
    module = _dino()
    with pytest.raises(ValueError, match="two global crops"):
        module.training_step(([torch.randn(2, 1, 32, 32)], torch.zeros(2)), 0)


# ---------------------------------------------------------------------------------------------------------------
# MAE
# ---------------------------------------------------------------------------------------------------------------


def test_mae_loss_falls_below_predicting_zero_and_backbone_loads_strictly(tmp_path):
    # One image, repeated: the decoder must place its content by position. Predicting zero for every normalised
    # pixel scores 15/16 (unbiased per-patch variance over 16 pixels); beating it shows real reconstruction.
    module = _mae(lr=3e-3, backbone_path=str(tmp_path / "mae" / "encoder.safetensors"))
    images = _smooth_images()[:1].expand(BATCH, -1, -1, -1).contiguous()
    losses = _fit(module, (images, torch.zeros(BATCH, dtype=torch.long)), steps=60)
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[:5]) > 0.95 and np.mean(losses[-5:]) < 0.9, losses

    images = _smooth_images(seed=1)

    plain = _plain_vit()
    plain.load_state_dict(module.backbone_state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), module.mae.encoder.eval()(images))
    assert load_model(tmp_path / "mae" / "encoder.safetensors").global_pool == "avg"  # written at the end of fit


def test_mae_encoder_file_moves_the_final_norm_to_fc_norm_for_fine_tuning(tmp_path):
    module = _mae(pretrained_cfg=CFG)
    encoder = module.mae.encoder.eval()
    with torch.no_grad():  # random final-norm weights, so that the mapping is visible
        encoder.norm.weight.normal_()
        encoder.norm.bias.normal_()
    path = module.save_backbone(tmp_path / "encoder.safetensors")

    loaded = load_model(path)
    assert loaded.attnprune_spec["paradigm"] == "mae" and loaded.global_pool == "avg"
    assert isinstance(loaded.norm, nn.Identity) and isinstance(loaded.fc_norm, nn.LayerNorm)
    torch.testing.assert_close(loaded.fc_norm.weight, encoder.norm.weight)
    assert tuple(loaded.pretrained_cfg["input_size"]) == (1, 32, 32)

    backbone = Backbone(model="auto", checkpoint=str(path), paradigm="mae", num_classes=10)
    classifier = PrunedClassifier(backbone, layer_decay=0.65)
    images = _smooth_images(seed=2)
    with torch.no_grad():
        assert classifier(images).shape == (BATCH, 10)
        features = classifier.model.forward_head(classifier.model.forward_features(images), pre_logits=True)
        tokens = encoder.blocks(encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(images))))
        patch_mean = tokens[:, encoder.num_prefix_tokens :].mean(dim=1)
        torch.testing.assert_close(features, encoder.norm(patch_mean))  # the encoder's LayerNorm of the average
        normed_mean = encoder.forward_features(images)[:, encoder.num_prefix_tokens :].mean(dim=1)
        assert not torch.allclose(features, normed_mean, atol=1e-3)  # not the average of per-token norms
    groups = create_optimizer_v2(classifier.model, opt="adamw", lr=1e-3, layer_decay=0.65).param_groups
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.65 ** (TINY["depth"] + 1))


@pytest.mark.parametrize("mask_ratio", [0.75, 0.6])
def test_mae_encoder_sees_only_the_visible_patches_and_the_class_token(mask_ratio):
    mae = _mae(mask_ratio=mask_ratio).mae
    keep = round(64 * (1 - mask_ratio))
    seen = []
    mae.encoder.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(tuple(args[0].shape)))
    loss, pred, mask = mae(_smooth_images())
    assert seen == [(BATCH, 1 + keep, 32)]
    assert pred.shape == (BATCH, 64, 4 * 4 * 1) and torch.isfinite(loss)
    assert mask.sum(dim=1).tolist() == [64 - keep] * BATCH
    assert len({tuple(row.tolist()) for row in mask}) > 1  # each image draws its own mask

    tokens = torch.arange(64.0).expand(BATCH, 64)[..., None]  # token value = its position
    visible, mask, restore = mae.random_masking(tokens)
    for row_visible, row_mask in zip(visible[..., 0], mask, strict=True):
        assert sorted(row_visible.tolist()) == torch.nonzero(row_mask == 0)[:, 0].float().tolist()
    hidden = torch.zeros(BATCH, 64 - keep, 1)
    restored = torch.cat([visible, hidden], dim=1).gather(1, restore[..., None])
    torch.testing.assert_close(restored, tokens * (1 - mask)[..., None])


def test_mae_patchify_matches_the_patch_embedding_order():
    mae = _mae().mae
    images = _smooth_images()
    proj = mae.encoder.patch_embed.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)  # (p_h, p_w, C) like patchify
    with torch.no_grad():
        torch.testing.assert_close(mae.patchify(images) @ weight.T + proj.bias, mae.encoder.patch_embed(images))


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("limits", [dict(max_epochs=2), dict(max_steps=8)])
def test_lr_warms_up_linearly_per_step_then_follows_a_cosine(limits):
    module = _mae(lr=1e-3, warmup_epochs=1)
    record = _RecordLR()
    trainer = L.Trainer(
        **limits,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    loader = DataLoader(_Repeat((_smooth_images(), torch.zeros(BATCH)), 4), batch_size=None)  # 4 steps per epoch
    trainer.fit(module, loader)
    expected = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(record.lrs, [1e-3 * f for f in expected], rtol=1e-6)

    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is module.mae.encoder.pos_embed for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])


def _mae_batch() -> tuple[Tensor, Tensor]:
    return _smooth_images(), torch.zeros(BATCH)


@pytest.mark.parametrize(("make", "batch"), [(_dino, _dino_batch), (_mae, _mae_batch)], ids=["dino", "mae"])
def test_the_model_summary_shows_the_backbones_flops(capsys, make, batch):
    module = make()
    trainer = L.Trainer(
        fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[FlopsModelSummary()]
    )
    trainer.fit(module, DataLoader(_Repeat(batch(), 1), batch_size=None))
    printed = capsys.readouterr().out
    flops = count_flops(module.backbone)  # the student's or the encoder's ViT at its input size
    assert flops == count_flops(timm.create_model(ARCH, num_classes=0, **TINY)) > 0
    assert f"Total FLOPs: {get_human_readable_count(flops)}" in printed and "Total FLOPs: 0" not in printed
