"""The reference encoder: both backends load real-format local files, preprocessing geometry, errors."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, MissingFileError
from dreampainter.models import ReferenceEncoder, prepare_reference
from dreampainter.models.reference_encoder import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from dreampainter.toy.models import (
    build_tiny_reference_encoder,
    write_tiny_clip_vision_folder,
    write_tiny_open_clip_checkpoint,
)


@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_open_clip_backend_matches_open_clip(tmp_path, safetensors):
    name, path = write_tiny_open_clip_checkpoint(tmp_path, safetensors=safetensors)
    encoder = ReferenceEncoder.from_open_clip(name, path)
    reference = open_clip.create_model(name, pretrained=str(path)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = encoder(pixels)
    with torch.no_grad():
        assert torch.allclose(out.image_embeds, reference.encode_image(pixels), atol=1e-6)
        # penultimate tokens: run open_clip's own blocks up to the second-to-last one
        visual = reference.visual
        x = visual._embeds(pixels)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    assert out.hidden_states.shape == (2, 17, 32)
    assert torch.allclose(out.hidden_states, x, atol=1e-6)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_transformers_backend_matches_transformers(tmp_path):
    folder = write_tiny_clip_vision_folder(tmp_path / "image_encoder")
    encoder = ReferenceEncoder.from_transformers(folder)
    reference = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
    out = encoder(pixels)
    assert torch.allclose(out.image_embeds, expected.image_embeds, atol=1e-6)
    assert torch.allclose(out.hidden_states, expected.hidden_states[-2], atol=1e-6)
    assert out.image_embeds.shape == (2, encoder.image_embed_dim) and encoder.hidden_size == 32


@pytest.mark.parametrize("backend", ["transformers", "open_clip"])
def test_save_pretrained_round_trip(tmp_path, backend):
    encoder = build_tiny_reference_encoder(backend, resize_mode="crop")
    encoder.save_pretrained(tmp_path)
    loaded = ReferenceEncoder.from_pretrained(tmp_path)
    assert loaded.config.backend == backend and loaded.config.resize_mode == "crop"
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(pixels).hidden_states, encoder(pixels).hidden_states)
    assert torch.equal(loaded(pixels).image_embeds, encoder(pixels).image_embeds)


def _normalised(value):
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (value - mean) / std


def test_pad_keeps_aspect_and_pads_with_the_mean():
    image = torch.ones(3, 16, 32)  # white, 2:1 landscape
    out = prepare_reference(image, size=32, mode="pad")
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, :7], torch.zeros(3, 7, 32), atol=1e-5)  # top band: the mean colour
    assert torch.allclose(out[:, -7:], torch.zeros(3, 7, 32), atol=1e-5)
    assert torch.allclose(out[:, 10:22], _normalised(torch.ones(3, 12, 32)), atol=1e-5)  # the image, undistorted


def test_crop_takes_the_centre():
    image = torch.zeros(3, 32, 64)
    image[:, :, 16:48] = 1.0  # a white centre square, black sides
    out = prepare_reference(image, size=32, mode="crop")
    assert torch.allclose(out, _normalised(torch.ones(3, 32, 32)), atol=1e-4)


def test_preprocess_accepts_pil_arrays_and_tensors():
    encoder = build_tiny_reference_encoder("transformers")
    pil = Image.fromarray(np.full((20, 40, 3), 200, dtype=np.uint8))
    gray = Image.fromarray(np.full((20, 40), 200, dtype=np.uint8), mode="L")
    array = np.full((20, 40, 3), 200, dtype=np.uint8)
    tensor = torch.full((3, 20, 40), 200 / 255)
    outs = [encoder.preprocess(x) for x in (pil, gray, array, tensor)]
    for out in outs:
        assert out.shape == (1, 3, 32, 32)
        assert torch.allclose(out, outs[0], atol=1e-5)
    assert encoder.preprocess([pil, pil]).shape == (2, 3, 32, 32)
    with pytest.raises(InvalidInputError, match="reference image 0"):
        encoder.preprocess("not an image")


def test_missing_and_wrong_files_give_clear_errors(tmp_path):
    with pytest.raises(MissingFileError, match="open_clip weights for ViT-H-14 not found.*download"):
        ReferenceEncoder.from_open_clip("ViT-H-14", tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(MissingFileError, match="CLIP vision config not found"):
        ReferenceEncoder.from_transformers(tmp_path / "image_encoder")
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(InvalidInputError, match="unknown open_clip model name"):
        ReferenceEncoder.from_open_clip("ViT-Nope", tmp_path / "x.bin")
    with pytest.raises(InvalidInputError, match="cannot read open_clip checkpoint"):
        ReferenceEncoder.from_open_clip("ViT-B-32", tmp_path / "x.bin")
    name, path = write_tiny_open_clip_checkpoint(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="does not match the model: missing"):
        ReferenceEncoder.from_open_clip("ViT-B-32", path)  # weights of another architecture
    torch.save({"text.weight": torch.zeros(2)}, tmp_path / "text_only.bin")
    with pytest.raises(CheckpointMismatchError, match="no 'visual"):
        ReferenceEncoder.from_open_clip(name, tmp_path / "text_only.bin")
