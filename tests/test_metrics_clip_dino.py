"""CLIP-T / CLIP-I and DINO with tiny random backbones saved to disk and loaded through the real loaders."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreampainter.errors import CheckpointMismatchError, MissingFileError
from dreampainter.evaluation.backbones import load_clip, load_dino
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.evaluation.clip_scores import ClipMetric
from dreampainter.evaluation.dino import DinoMetric
from dreampainter.toy.backbones import save_tiny_clip, save_tiny_dino

PROMPTS = ["a red mug on a wooden table", "a shoe on the beach at sunset", "", "a lamp in a grey studio"]


def make_batch(seed=0, same_reference=False):
    rng = np.random.default_rng(seed)
    results = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in PROMPTS]
    references = (
        results if same_reference else [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in PROMPTS]
    )
    mask = np.zeros((40, 48), np.uint8)
    keys = [f"s{i}" for i in range(len(PROMPTS))]
    return EvalBatch.from_lists(keys, results, results, results, [mask] * 4, references, prompt=PROMPTS)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    name = save_tiny_clip(path, seed=1)
    return load_clip(name, path), path


def test_clip_loader_reads_the_saved_weights(clip):
    backbone, path = clip
    saved = torch.load(path, weights_only=True)
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_clip_t_is_torchmetrics_clip_score_formula_and_clip_i_is_cosine(clip):
    backbone, _ = clip
    batch = make_batch()
    rows = ClipMetric(backbone, progress=False).update(batch)
    model, preprocess = backbone.model, backbone.preprocess
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.fromarray(s.composited)) for s in batch]))
        references = model.encode_image(
            torch.stack([preprocess(Image.fromarray(s.reference)) for s in batch])
        )
        texts = model.encode_text(backbone.tokenizer([p for p in PROMPTS if p]))
    cos = torch.nn.functional.cosine_similarity
    expected_t = (100 * cos(images[[0, 1, 3]].double(), texts.double())).clamp(min=0)  # CLIPScore
    assert [rows[i]["clip_t"] for i in (0, 1, 3)] == pytest.approx(expected_t.tolist(), abs=1e-4)
    assert np.isnan(rows[2]["clip_t"])  # no prompt: not measured
    expected_i = cos(images.double(), references.double())
    assert [row["clip_i"] for row in rows] == pytest.approx(expected_i.tolist(), abs=1e-5)


def test_clip_score_clamps_negative_cosine_to_zero_and_identical_reference_scores_one(clip):
    from dreampainter.evaluation.clip_scores import clip_score

    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    assert clip_score(a, b).tolist() == pytest.approx([0.0, 100 / np.sqrt(2)])
    backbone, _ = clip
    metric = ClipMetric(backbone, progress=False)
    metric.update(make_batch(same_reference=True))
    assert metric.compute()["clip_i"] == pytest.approx(1.0, abs=1e-6)


def test_missing_or_mismatched_clip_weights_are_clear_errors(tmp_path, clip):
    with pytest.raises(MissingFileError, match="vit_l14.bin") as info:
        load_clip("ViT-L-14", tmp_path / "vit_l14.bin")
    assert "open_clip" in str(info.value)
    backbone, tiny_path = clip
    state = torch.load(tiny_path, weights_only=True)
    state["text_projection"] = state["text_projection"][:, :16]  # a checkpoint of another width
    torch.save(state, tmp_path / "other.bin")
    with pytest.raises(CheckpointMismatchError, match="other.bin"):
        load_clip(backbone.name.split(":")[1], tmp_path / "other.bin")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "model.safetensors"
    arch, kwargs = save_tiny_dino(path, seed=2)
    return load_dino(arch, path, model_kwargs=kwargs), path, arch, kwargs


def test_dino_is_cls_cosine_of_the_loaded_vit(dino):
    backbone, path, _, _ = dino
    saved = load_file(path)
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    batch = make_batch(seed=3)
    rows = DinoMetric(backbone, progress=False).update(batch)
    with torch.no_grad():
        features = backbone.model.forward_head(
            backbone.model.forward_features(
                torch.stack([backbone.transform(Image.fromarray(s.composited)) for s in batch])
            ),
            pre_logits=True,
        )
        references = backbone.model(
            torch.stack([backbone.transform(Image.fromarray(s.reference)) for s in batch])
        )
    expected = torch.nn.functional.cosine_similarity(features.double(), references.double())
    assert [row["dino"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    same = DinoMetric(backbone, progress=False)
    same.update(make_batch(same_reference=True))
    assert same.compute()["dino"] == pytest.approx(1.0, abs=1e-6)


def test_dino_reads_fair_style_checkpoints_and_reports_mismatches(tmp_path, dino):
    backbone, path, arch, kwargs = dino
    fair = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in load_file(path).items()}, "epoch": 100}, fair)
    other = load_dino(arch, fair, model_kwargs=kwargs)
    image = [np.full((32, 32, 3), 90, np.uint8)]
    assert torch.allclose(other.encode_images(image), backbone.encode_images(image))
    with pytest.raises(CheckpointMismatchError, match="model.safetensors"):
        load_dino(arch, path, model_kwargs={**kwargs, "depth": 3})
    with pytest.raises(CheckpointMismatchError, match="model.safetensors") as info:
        load_dino(arch, path, model_kwargs={**kwargs, "embed_dim": 48})
    assert "\n" not in str(info.value)  # the CLI prints errors as one line
    with pytest.raises(MissingFileError, match="dino_vits16.pth") as info:
        load_dino(arch, tmp_path / "dino_vits16.pth")
    assert "vit_small_patch16_224.dino" in str(info.value)
