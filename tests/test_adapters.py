"""transformers ViTs and open_clip image towers, converted to timm ViTs (attnprune.adapters): the library's own outputs
unpruned, the same pruned logits as a timm model built directly with the same weights, FLOPs as torch counts them,
the library's preprocessing, loading (hf:, open_clip:), evaluate.py on a saved transformers model, and the one-line
errors for what cannot be converted or loaded. Tiny random configs built here; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import transformers
import yaml
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from attnprune import Routing, convert, count_flops, load_model, prune, save_model, unprune
from attnprune.cli.evaluate import COLUMNS
from attnprune.errors import HubUnavailableError, UserError
from attnprune.flops import linear_macs
from tests.conftest import ROOT, make_image_folder, script_env
from tests.test_flops import measured_macs

PRESETS = ["tome:r=2", "evit:keep=0.7", "topk_attention:keep=0.7", "pitome:ratio=0.9"]
HF_DIMS = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
HF_CLASSES = [
    ("ViTModel", {}),
    ("ViTForImageClassification", {}),
    ("DeiTModel", {}),
    ("DeiTForImageClassification", {}),
    ("DeiTForImageClassificationWithTeacher", {}),
    ("Dinov2Model", {}),
    ("Dinov2ForImageClassification", {}),
    ("Dinov2WithRegistersModel", {"num_register_tokens": 2}),
    ("Dinov2WithRegistersForImageClassification", {"num_register_tokens": 2}),
]
TOWERS = {  # open_clip vision configs: class-token pooling; layer scale, QuickGELU, average pooling after the norm;
    # no pre-norm with the norm before average pooling
    "tok": ({}, False),
    "avg-ls-quickgelu": ({"ls_init_value": 0.1, "pool_type": "avg", "final_ln_after_pool": True}, True),
    "avg-no-ln-pre": ({"no_ln_pre": True, "pool_type": "avg"}, False),
}


def hf_model(name: str, seed: int = 0, **config) -> nn.Module:
    """A tiny transformers model with every weight perturbed (random init leaves norms at one, biases and layer scale
    constant: a swapped weight would go unseen)."""
    cls = getattr(transformers, name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**{**HF_DIMS, "num_labels": 5, **config})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def library_output(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """A transformers model's logits, or a base model's normed class token."""
    with torch.no_grad():
        out = model(pixel_values=images, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]


def tiny_clip(tower: str = "tok", seed: int = 0) -> nn.Module:
    """A tiny open_clip CLIP model (32 px, patch 8, width 32, depth 3) with perturbed weights."""
    vision, quick_gelu = TOWERS[tower]
    torch.manual_seed(seed)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=8, image_size=32, **vision),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=quick_gelu,
    ).eval()
    with torch.no_grad():
        for param in clip.visual.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return clip


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_one_line(err: pytest.ExceptionInfo, text: str) -> None:
    message = str(err.value)
    assert "\n" not in message and text in message, message


def run_script(script: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """One of the repository's entry points run as a user runs it, from ``cwd``."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


# ------------------------------------------------------------------------------------------- the library's outputs
@pytest.mark.parametrize("name, config", HF_CLASSES, ids=[name for name, _ in HF_CLASSES])
def test_a_converted_transformers_model_computes_what_the_library_computes(name, config, images):
    hf = hf_model(name, **config)
    expected = library_output(hf, images)
    model = convert(hf)
    with torch.no_grad():
        assert (model(images) - expected).abs().max() <= 1e-5
    assert torch.equal(library_output(hf, images), expected)  # the library's model is left as it was
    assert model.num_prefix_tokens == {"Dei": 2, "Din": 1 + config.get("num_register_tokens", 0)}.get(name[:3], 1)


@pytest.mark.parametrize("name", ["Dinov2Model", "Dinov2WithRegistersModel"])
def test_dinov2_takes_the_processors_crop_as_transformers_interpolates_its_positions(name, images):
    """Trained at 48 px (6 x 6 patches), run at the processor's 32 px crop: transformers interpolates the position
    embedding at every forward, the converted model holds it resampled the same way (antialiased with registers)."""
    hf = hf_model(name, image_size=48)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    model = convert(hf, processor)
    assert model.patch_embed.img_size == (32, 32) and model.pretrained_cfg["input_size"] == (3, 32, 32)
    with torch.no_grad():
        assert (model(images) - library_output(hf, images)).abs().max() <= 1e-5


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_a_converted_open_clip_tower_makes_encode_image_prune(tower, images):
    clip = tiny_clip(tower)
    with torch.no_grad():
        expected = clip.encode_image(images)
        clip.visual = convert(clip.visual)
        assert (clip.encode_image(images) - expected).abs().max() <= 1e-5
        twin = convert(tiny_clip(tower).visual)
        for spec in PRESETS:
            prune(clip, spec)  # finds the converted tower in clip.visual
            assert clip.visual.routing == Routing.parse(spec, 3)
            assert (clip.encode_image(images) - prune(twin, spec)(images)).abs().max() <= 1e-6
            assert count_flops(clip) == count_flops(twin) < count_flops(twin, "unpruned")
        assert not hasattr(unprune(clip).visual, "routing")
        assert (clip.encode_image(images) - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------- pruned, as a timm model built directly
def timm_twin(hf: nn.Module) -> nn.Module:
    """timm's own model (``timm.create_model``) holding a transformers ViT's or DeiT's weights, converted here module
    by module (as timm's checkpoint filters convert other layouts), independently of attnprune.adapters."""
    base, distilled = hf.base_model, hasattr(hf, "distillation_classifier")
    arch = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)
    model = timm.create_model(arch, norm_layer=partial(nn.LayerNorm, eps=hf.config.layer_norm_eps), **kwargs).eval()
    emb = base.embeddings
    state = {
        "cls_token": emb.cls_token,
        "pos_embed": emb.position_embeddings,
        "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
        "norm.weight": base.layernorm.weight,
        "norm.bias": base.layernorm.bias,
    }
    heads = (
        {"head": hf.cls_classifier, "head_dist": hf.distillation_classifier} if distilled else {"head": hf.classifier}
    )
    if distilled:
        state["dist_token"] = emb.distillation_token
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer  # transformers 5, 4
    for i, layer in enumerate(layers):
        attn = layer.attention
        if hasattr(attn, "q_proj"):
            q, k, v, out, fc1, fc2 = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.fc1, layer.mlp.fc2
        else:
            q, k, v = attn.attention.query, attn.attention.key, attn.attention.value
            out, fc1, fc2 = attn.output.dense, layer.intermediate.dense, layer.output.dense
        modules = {"attn.proj": out, "mlp.fc1": fc1, "mlp.fc2": fc2}
        modules.update({"norm1": layer.layernorm_before, "norm2": layer.layernorm_after})
        heads.update({f"blocks.{i}.{name}": module for name, module in modules.items()})
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
    for name, module in heads.items():
        state.update({f"{name}.weight": module.weight, f"{name}.bias": module.bias})
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_every_preset_prunes_a_transformers_model_as_timms_own_model(name, images):
    hf = hf_model(name)
    converted, direct = convert(hf), timm_twin(hf)
    with torch.no_grad():
        assert (converted(images) - library_output(hf, images)).abs().max() <= 1e-5
        assert (direct(images) - library_output(hf, images)).abs().max() <= 1e-5
        for spec in PRESETS:
            pruned = prune(converted, spec)(images)
            assert (pruned - prune(direct, spec)(images)).abs().max() <= 1e-5, spec
            assert (pruned - library_output(hf, images)).abs().max() > 1e-4, spec  # the preset did prune


def test_dinov2s_classifier_reads_the_size_weighted_mean_when_tokens_merge(images):
    """Pruned, DINOv2's head reads the class token beside the mean of the patch tokens, a merged token counting for
    every patch it stands for: the class-token and average-pool readouts of the same pruned backbone, concatenated."""
    hf = hf_model("Dinov2WithRegistersForImageClassification", num_register_tokens=2)
    backbone = transformers.Dinov2WithRegistersModel(hf.config).eval()
    backbone.load_state_dict(hf.base_model.state_dict())
    token, mean = convert(backbone), convert(backbone)
    mean.reset_classifier(0, "avg")  # the final norm stays before the pool: the mean of the normed patch tokens
    with torch.no_grad():
        for spec in ("tome:r=3", "evit:keep=0.5"):
            features = torch.cat([prune(token, spec)(images), prune(mean, spec)(images)], dim=-1)
            expected = hf.classifier(features)
            assert (prune(convert(hf), spec)(images) - expected).abs().max() <= 1e-5, spec


# ------------------------------------------------------------------------------------------------------- FLOPs
def adapters() -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """Every converted model and the library's model when torch's counter sees all of its work (open_clip's
    ``nn.MultiheadAttention`` fast path it does not)."""
    out = {name: (convert(hf), hf) for name, hf in ((n, hf_model(n, **c)) for n, c in HF_CLASSES)}
    out.update({f"open_clip-{tower}": (convert(tiny_clip(tower).visual), None) for tower in TOWERS})
    return out


def test_count_flops_agrees_with_torchs_counter_on_every_adapter(images):
    for name, (model, library) in adapters().items():
        unpruned = count_flops(model, "unpruned")
        assert unpruned == pytest.approx(measured_macs(unprune(model), images), rel=1e-3), name
        if library is not None:  # a base model's pooler (dense and tanh) is not part of the converted model
            pooler = linear_macs(getattr(library, "pooler", None))
            assert unpruned == pytest.approx(measured_macs(library, images) - pooler, rel=1e-3), name
        for spec in PRESETS:
            assert count_flops(model, spec) == pytest.approx(measured_macs(prune(model, spec), images), rel=0.02), (
                name,
                spec,
            )


# ------------------------------------------------------------------------------------------------ preprocessing
def test_the_image_processors_preprocessing_becomes_timms_data_config():
    """Each processor's size, crop, interpolation, mean and std as timm's transform: equal pixels (sizes at which the
    resize is the identity, so the two libraries' resampling code is not compared)."""
    cases = [  # processor, image size, crop mode, crop_pct, interpolation
        (transformers.ViTImageProcessor(size={"height": 32, "width": 32}), (32, 32), "squash", 1.0, "bilinear"),
        (
            transformers.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}),
            (36, 36),
            "squash",
            32 / 36,
            "bicubic",
        ),
        (
            transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}),
            (36, 44),
            "center",
            32 / 36,
            "bicubic",
        ),
    ]
    rng = np.random.default_rng(0)
    for processor, (height, width), mode, crop_pct, interpolation in cases:
        model = convert(hf_model("ViTForImageClassification"), processor)
        cfg = model.pretrained_cfg
        assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"]) == (
            mode,
            pytest.approx(crop_pct),
            interpolation,
        )
        assert cfg["mean"] == tuple(processor.image_mean) and cfg["std"] == tuple(processor.image_std)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        ours = create_transform(**resolve_model_data_config(model))(image)
        assert ours.shape == expected.shape == (3, 32, 32)
        assert (ours - expected).abs().max() <= 1e-5, type(processor).__name__


def test_open_clips_transform_becomes_timms_data_config():
    rng = np.random.default_rng(0)
    for resize_mode, size in (("squash", (32, 32)), ("shortest", (40, 48))):
        clip = tiny_clip()
        cfg = {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4), "interpolation": "bilinear"}
        open_clip.model.set_model_preprocess_cfg(clip, {**cfg, "resize_mode": resize_mode})
        tower = convert(clip.visual)
        assert tower.pretrained_cfg["mean"] == cfg["mean"] and tower.pretrained_cfg["interpolation"] == "bilinear"
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        transform = open_clip.image_transform(32, False, cfg["mean"], cfg["std"], resize_mode, "bilinear")
        ours = create_transform(**resolve_model_data_config(tower))(image)
        assert (ours - transform(image)).abs().max() <= 1e-6, resize_mode


# ------------------------------------------------------------------------------------------------------ loading
@pytest.fixture
def saved_vit(tmp_path) -> tuple[Path, nn.Module]:
    """A tiny ViTForImageClassification and its image processor saved with save_pretrained."""
    hf = hf_model("ViTForImageClassification", num_labels=3)
    hf.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit", hf


def test_a_save_pretrained_folder_loads_with_its_processor_and_saves_as_our_weights(saved_vit, images, tmp_path):
    folder, hf = saved_vit
    model = load_model(f"hf:{folder}")
    assert not model.training and model.num_classes == 3
    assert (model.pretrained_cfg["interpolation"], model.pretrained_cfg["mean"]) == ("bilinear", (0.5, 0.5, 0.5))
    with torch.no_grad():
        assert (model(images) - library_output(hf, images)).abs().max() <= 1e-5
    spec = model.attnprune_spec  # rebuilt from our file alone, without transformers
    path = save_model(model, tmp_path / "vit.safetensors", spec["architecture"], model_kwargs=spec["model_kwargs"])
    loaded = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert loaded.pretrained_cfg["mean"] == [0.5, 0.5, 0.5] and loaded.blocks[0].norm1.eps == 1e-12


def test_open_clip_names_load_the_converted_tower(tmp_path, images):
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "attnprune-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "attnprune-tiny-clip.json")
    clip = open_clip.create_model("attnprune-tiny-clip").eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    tower = load_model(f"open_clip:attnprune-tiny-clip:{tmp_path / 'clip.pt'}")
    with torch.no_grad():
        assert (tower(images) - clip.encode_image(images)).abs().max() <= 1e-5
    assert tower.pretrained_cfg["input_size"] == (3, 32, 32) and tower.num_classes == 16
    random = load_model("open_clip:attnprune-tiny-clip")  # no weights: open_clip's random initialisation
    assert count_flops(random) == count_flops(tower)
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt does not exist"):
        load_model(f"open_clip:attnprune-tiny-clip:{tmp_path / 'missing.pt'}")
    with pytest.raises(UserError, match="unknown open_clip architecture 'no-such-arch'") as err:
        load_model("open_clip:no-such-arch")
    assert_one_line(err, "open_clip.list_models()")


# ------------------------------------------------------------------------------------------------------- errors
def test_what_cannot_be_converted_is_one_line_naming_it(saved_vit, tmp_path):
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(image_size=32, embed_dim=16, depths=[1]))
    with pytest.raises(TypeError) as err:
        convert(swin)
    assert_one_line(err, "transformers' SwinForImageClassification cannot be converted; supported: ViTModel")
    swin.save_pretrained(tmp_path / "swin")
    with pytest.raises(UserError) as err:
        load_model(f"hf:{tmp_path / 'swin'}")
    assert_one_line(err, "is a SwinForImageClassification, which attnprune cannot convert; supported: ViTModel")
    with pytest.raises(UserError) as err:
        convert(transformers.Dinov2Model(transformers.Dinov2Config(**HF_DIMS, use_swiglu_ffn=True)))
    assert_one_line(err, "Dinov2Model: use_swiglu_ffn=True (a SwiGLU MLP, DINOv2 ViT-g) is not supported")
    with pytest.raises(TypeError) as err:
        prune(hf_model("ViTForImageClassification"), "tome:r=2")
    assert_one_line(err, "got ViTForImageClassification; convert a transformers or open_clip model first")
    with pytest.raises(TypeError) as err:
        convert(tiny_clip())
    assert_one_line(err, "not the whole CLIP: model.visual = attnprune.convert(model.visual)")
    with pytest.raises(UserError) as err:
        load_model(f"hf:{saved_vit[0] / 'config.json'}")
    assert_one_line(err, "config.json is a file; expected a folder saved by save_pretrained")
    with pytest.raises(FileNotFoundError, match="folder .*/nowhere does not exist"):
        load_model(f"hf:{tmp_path / 'nowhere'}")


@pytest.mark.parametrize(
    "vision, option",
    [
        ({"attentional_pool": True}, "attentional_pool"),
        ({"qk_norm": True}, "block_type='custom' (CustomResidualAttentionBlock"),
        ({"output_tokens": True}, "output_tokens=True"),
        ({"pool_type": "none"}, "pool_type='none'"),
    ],
)
def test_open_clip_towers_timm_cannot_express_are_refused(vision, option):
    cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32, **vision)
    clip = open_clip.CLIP(16, cfg, CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    with pytest.raises(UserError) as err:
        convert(clip.visual)
    assert_one_line(err, f"open_clip VisionTransformer with {option}")


def test_a_hub_name_offline_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as err:
        load_model("hf:attnprune-tests/no-such-vit")
    assert time.perf_counter() - start < 10
    assert_one_line(err, "could not load Hugging Face model 'hf:attnprune-tests/no-such-vit'")
    assert "Offline, pass a folder saved by save_pretrained" in str(err.value)


def test_a_hub_name_offline_is_one_line_on_the_command_line(tmp_path):
    result = run_script(
        "quickstart.py", ["--model", "hf:attnprune-tests/no-such-vit"], tmp_path, PYTHONWARNINGS="ignore"
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "hf:attnprune-tests/no-such-vit" in lines[0] and "Traceback" not in result.stderr


def test_attnprune_imports_without_the_optional_libraries(tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = sys.modules['open_clip'] = None\n"
        "import attnprune\n"
        "try:\n    attnprune.load_model('hf:google/vit-base-patch16-224')\n"
        "except attnprune.errors.UserError as err:\n    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers is not installed" in result.stdout and "pip install 'attnprune[hf]'" in result.stdout


# ----------------------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_runs_on_a_saved_transformers_model_with_the_columns_of_timm_models(saved_vit, tmp_path):
    folder, hf = saved_vit
    make_image_folder(tmp_path / "data", train_per_class=2, test_per_class=2)
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        "model": {
            "class_path": "attnprune.lit.modules.PrunedClassifier",
            "init_args": {"backbone": {"model": "auto", "checkpoint": f"hf:{folder}"}},
        },
        "data": {
            "class_path": "attnprune.lit.data.ImageFolderDataModule",
            "init_args": {"root": str(tmp_path / "data"), "batch_size": 4, "cache_dir": str(tmp_path)},
        },
    }
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", "evaluate.yaml", "--output_dir", "out", "--routings", '[unpruned, "tome:r=4"]']
    result = run_script("evaluate.py", [*args, "--throughput_repeats", "1"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS
    filled = [c for c in COLUMNS if c not in ("top5", "top5_err")]  # no top-5 of 3 classes, as for a timm model
    assert all(row[c] != "" for row in table for c in filled)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    model = convert(hf)
    assert [row["routing"] for row in rows] == ["unpruned", "tome-r4"]
    assert [row["gflops"] for row in rows] == pytest.approx(
        [count_flops(model, s) / 1e9 for s in ("unpruned", "tome:r=4")]
    )
    for row in rows:
        assert (row["model"], row["checkpoint"], row["images"]) == ("VisionTransformer", f"hf:{folder}", 6)
        assert (row["img_size"], row["crop_pct"], row["interpolation"]) == (32, 1.0, "bilinear")


def test_search_py_searches_a_saved_transformers_model(saved_vit, tmp_path):
    folder, hf = saved_vit
    make_image_folder(tmp_path / "data", train_per_class=4, test_per_class=2)
    out = tmp_path / "search" / "routing.yaml"
    data = ["--data.class_path", "attnprune.lit.data.ImageFolderDataModule", "--data.init_args.root", "data"]
    data += ["--data.init_args.val_size", "6", "--data.init_args.cache_dir", str(tmp_path)]
    args = ["--model", f"hf:{folder}", *data, "--budget", "0.7", "--val_images", "6", "--output", str(out)]
    result = run_script("search.py", args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = convert(hf)
    assert count_flops(model, Routing.from_yaml(out)) <= 0.7 * count_flops(model)


def test_the_search_and_the_selectivity_analysis_run_on_converted_models():
    """DINOv2's class+mean head, a CLIP tower (its embedding as output) and DeiT's two heads, in the API."""
    from attnprune.search import search_routing
    from attnprune.selectivity.analysis import SelectivityAnalyzer

    models = [
        convert(hf_model("Dinov2WithRegistersForImageClassification", num_register_tokens=2)),
        convert(tiny_clip().visual),
        convert(hf_model("DeiTForImageClassificationWithTeacher")),
    ]
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 5, (8,))) for _ in range(2)]
    for model in models:
        result = search_routing(
            model, batches, 0.7, progress=False, screen_images=8, finalists=2, beam_width=1, holdout=0.5
        )
        assert count_flops(model, result.routing) <= 0.7 * count_flops(model), type(model).__name__
        analyzer = SelectivityAnalyzer(len(model.blocks), model.has_class_token)
        analyzer.update(model, batches[0][0])
        metrics = analyzer.compute()  # one value per layer; layer stability has none at the first layer
        assert len(metrics["reliability_spearman_cls_attention"]) == len(model.blocks)
        assert all(np.isfinite(per_layer[key == "layer_stability" :]).all() for key, per_layer in metrics.items())
