"""Model-backed components of the data build, each loading a tiny random model saved in its real format."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter.data.build.models.common import dilate, mask_box
from dreampainter.errors import InvalidInputError, MissingFileError

RNG = np.random.default_rng(0)


def _photo(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _mask(height: int, width: int, box=None) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    y0, y1, x0, x1 = box or (height // 4, 3 * height // 4, width // 3, 2 * width // 3)
    mask[y0:y1, x0:x1] = 255
    return mask


def _garbage(tmp_path, name: str = "model.bin"):
    path = tmp_path / name
    path.write_bytes(b"this is not a model file\n" * 4)
    return path


# ----------------------------------------------------------------------------------------- helpers


def test_mask_box_and_dilation():
    mask = _mask(20, 30, (5, 9, 10, 16))
    assert mask_box(mask) == (10, 5, 16, 9)
    assert mask_box(np.zeros((4, 4), np.uint8)) is None
    grown = dilate(mask, 2)
    assert grown[5:9, 10:16].all() and grown[3, 12] and not grown[2, 12]  # 2 px above, not 3
    assert not grown[3, 8]  # the corner grows as a disc, not a square
    assert np.array_equal(dilate(mask, 0), mask > 127)


# ------------------------------------------------------------------------------------- ONNX segmenter


class _TinySalient(torch.nn.Module):
    """U²-Net-like outputs: a probability map first, then a logit map (BiRefNet-like)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        logits = self.head(torch.relu(self.conv(x))) * 4.0
        return torch.sigmoid(logits), logits


@pytest.fixture(scope="module")
def salient(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    net = _TinySalient().eval()
    dynamic, fixed = folder / "dynamic.onnx", folder / "fixed.onnx"
    example = torch.zeros(1, 3, 32, 32)
    names = dict(input_names=["input"], output_names=["prob", "logits"])
    axes = {name: {0: "batch"} for name in ("input", "prob", "logits")}
    torch.onnx.export(net, example, str(dynamic), dynamic_axes=axes, dynamo=False, **names)
    torch.onnx.export(net, example, str(fixed), dynamo=False, **names)  # batch 1, 32x32, like rembg's files
    onnx.checker.check_model(str(dynamic))
    return net, dynamic, fixed


def test_onnx_segmenter_matches_torch_net(salient):
    from dreampainter.data.build.models.onnx_segmenter import OnnxSalientSegmenter

    net, dynamic, _ = salient
    segmenter = OnnxSalientSegmenter(dynamic, input_size=32, device="cpu")
    photos = [_photo(48, 40), _photo(20, 64), _photo(32, 32)]
    batch = segmenter.preprocess(photos)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    resized = np.asarray(Image.fromarray(photos[1]).resize((32, 32), Image.Resampling.LANCZOS)) / 255.0
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch[1], expected.transpose(2, 0, 1), atol=1e-5)
    with torch.no_grad():
        prob, _ = net(torch.from_numpy(batch))
    np.testing.assert_allclose(segmenter.run(batch), prob[:, 0].numpy(), atol=1e-4)

    results = segmenter(photos)
    assert len(results) == 3
    for photo, (mask, confidence) in zip(photos, results):
        assert mask.shape == photo.shape[:2] and mask.dtype == np.uint8
        assert isinstance(confidence, float) and 0.0 <= confidence <= 1.0
    raw = prob[1, 0].numpy()
    stretched = ((raw - raw.min()) / (raw.max() - raw.min())).astype(np.float32)
    full = np.asarray(Image.fromarray(stretched).resize((64, 20), Image.Resampling.BILINEAR))
    assert np.abs(results[1][0].astype(int) - np.rint(full * 255)).max() <= 1  # min-max, resized back


def test_onnx_segmenter_sigmoid_output_and_fixed_batch(salient):
    from dreampainter.data.build.models.onnx_segmenter import OnnxSalientSegmenter

    net, dynamic, fixed = salient
    photos = [_photo(32, 32), _photo(32, 32)]
    logits_segmenter = OnnxSalientSegmenter(
        dynamic, input_size=32, output_index=1, sigmoid="auto", device="cpu"
    )
    fixed_segmenter = OnnxSalientSegmenter(fixed, input_size=(32, 32), device="cpu")
    assert fixed_segmenter.batch_size == 1  # the file's batch axis is fixed: one photo per run
    with torch.no_grad():
        prob, _ = net(torch.from_numpy(logits_segmenter.preprocess(photos)))
    for (mask, _), expected in zip(logits_segmenter(photos), prob[:, 0].numpy()):
        assert (
            np.abs(mask.astype(int) - np.rint(expected * 255)).max() <= 1
        )  # sigmoid of the logits, no stretch
    for (mask, _), (reference, _) in zip(fixed_segmenter(photos), OnnxSalientSegmenter(dynamic, 32)(photos)):
        assert np.array_equal(mask, reference)


def test_onnx_segmenter_cuda_without_cuda_provider_runs_on_cpu(salient):
    import onnxruntime

    from dreampainter.data.build.models.onnx_segmenter import OnnxSalientSegmenter

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.warns(UserWarning, match="no CUDA execution provider"):
        segmenter = OnnxSalientSegmenter(salient[1], input_size=32, device="cuda")
    assert segmenter.session.get_providers() == ["CPUExecutionProvider"]


def test_map_confidence():
    from dreampainter.data.build.models.onnx_segmenter import map_confidence

    hard = np.zeros((8, 8), np.float32)
    hard[2:5, 2:5] = 1.0
    assert map_confidence(hard) == pytest.approx(1.0)
    assert map_confidence(np.full((8, 8), 0.6, np.float32)) == pytest.approx(0.2)
    assert map_confidence(hard, contrast=0.05) == pytest.approx(0.05)  # a stretched flat map
    assert map_confidence(np.zeros((8, 8), np.float32)) == 0.0  # nothing found


def test_onnx_segmenter_errors(salient, tmp_path):
    from dreampainter.data.build.models.onnx_segmenter import OnnxSalientSegmenter

    _, dynamic, fixed = salient
    with pytest.raises(MissingFileError, match=r"ONNX salient model not found: .*u2net\.onnx.*mask\.path"):
        OnnxSalientSegmenter(tmp_path / "u2net.onnx", device="cpu")
    with pytest.raises(InvalidInputError, match="not a readable ONNX model"):
        OnnxSalientSegmenter(_garbage(tmp_path, "bad.onnx"), device="cpu")
    with pytest.raises(InvalidInputError, match="takes 32x32, not 320x320"):
        OnnxSalientSegmenter(fixed, device="cpu")
    with pytest.raises(InvalidInputError, match="output_index"):
        OnnxSalientSegmenter(dynamic, input_size=32, output_index=2, device="cpu")
    segmenter = OnnxSalientSegmenter(dynamic, input_size=32, device="cpu")
    with pytest.raises(InvalidInputError, match=r"photos\[0\]: expected an HxWx3 uint8"):
        segmenter([np.zeros((8, 8), np.uint8)])


# ----------------------------------------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    folder = tmp_path_factory.mktemp("sam")
    config = SamConfig(
        vision_config=dict(
            hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=16, window_size=2, global_attn_indexes=[1], num_pos_feats=8, mlp_dim=32,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    SamModel(config).save_pretrained(str(folder))
    processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    SamProcessor(image_processor=processor).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("multimask", [False, True])
def test_sam_refiner_masks(sam_folder, multimask):
    from dreampainter.data.build.models.sam import SamRefiner

    refiner = SamRefiner(sam_folder, device="cpu", multimask=multimask, batch_size=2)
    photos = [_photo(40, 50), _photo(70, 30), _photo(24, 24)]
    masks = [_mask(40, 50), _mask(70, 30), np.zeros((24, 24), np.uint8)]
    refined = refiner(photos, masks)
    assert len(refined) == 3
    for photo, mask in zip(photos, refined):
        assert mask.shape == photo.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}


def test_sam_refiner_prompts_with_the_mask_box(sam_folder):
    from transformers import SamModel, SamProcessor

    from dreampainter.data.build.models.sam import SamRefiner

    refiner = SamRefiner(sam_folder, device="cpu")
    assert refiner.box(_mask(40, 50, (5, 9, 10, 16))) == [10.0, 5.0, 16.0, 9.0]
    assert refiner.box(np.zeros((40, 50), np.uint8)) == [0.0, 0.0, 50.0, 40.0]  # empty: the whole image
    photo, mask = _photo(40, 50), _mask(40, 50, (5, 30, 10, 40))
    model, processor = (
        SamModel.from_pretrained(str(sam_folder)).eval(),
        SamProcessor.from_pretrained(str(sam_folder)),
    )
    inputs = processor(images=[photo], input_boxes=[[[10.0, 5.0, 40.0, 30.0]]], return_tensors="pt")
    with torch.no_grad():
        out = model(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
        )
    expected = processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0][0, 0]
    assert np.array_equal(refiner([photo], [mask])[0], expected.numpy().astype(np.uint8) * 255)


def test_sam_refiner_errors(sam_folder, tmp_path):
    from dreampainter.data.build.models.sam import SamRefiner

    with pytest.raises(MissingFileError, match="SAM model folder not found: .*facebook/sam-vit-base"):
        SamRefiner(tmp_path / "sam", device="cpu")
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(InvalidInputError, match="model_type is 'blip', expected 'sam'"):
        SamRefiner(tmp_path / "blip", device="cpu")
    refiner = SamRefiner(sam_folder, device="cpu")
    with pytest.raises(InvalidInputError, match="differs from its photo"):
        refiner([_photo(40, 50)], [np.zeros((40, 40), np.uint8)])
    with pytest.raises(InvalidInputError, match="1 masks for 2 photos"):
        refiner([_photo(40, 50)] * 2, [np.zeros((40, 50), np.uint8)])


# ---------------------------------------------------------------------------------------------- LaMa


class _TinyLama(torch.nn.Module):
    """LaMa's TorchScript signature: image [0, 1] Bx3xHxW and mask Bx1xHxW in, Bx3xHxW out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if image.shape[2] % 8 != 0 or image.shape[3] % 8 != 0:
            raise RuntimeError("LaMa needs sides that are multiples of 8")
        masked = image * (1 - mask)
        return torch.sigmoid(self.conv(torch.cat([masked, mask], dim=1)))


class _OneInput(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image


@pytest.fixture(scope="module")
def lama_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lama") / "big-lama.pt"
    torch.manual_seed(0)
    torch.jit.script(_TinyLama().eval()).save(str(path))
    return path


def test_lama_reference_fills_only_the_dilated_mask(lama_file):
    from dreampainter.data.build.models.lama import LamaReference

    reference = LamaReference(lama_file, device="cpu", dilation=3, batch_size=2)
    photos = [_photo(30, 45), _photo(30, 45), _photo(17, 23), _photo(30, 45)]
    masks = [_mask(30, 45), _mask(30, 45, (2, 6, 2, 6)), _mask(17, 23), np.zeros((30, 45), np.uint8)]
    results = reference(photos, masks)
    assert len(results) == 4
    for photo, mask, result in zip(photos, masks, results):
        assert result.shape == photo.shape and result.dtype == np.uint8
        outside = ~dilate(mask, 3)
        assert np.array_equal(result[outside], photo[outside])
    assert np.array_equal(results[3], photos[3])  # nothing to remove
    assert not np.array_equal(results[0], photos[0])
    # inside: the model's own output on the padded photo (symmetric padding to 32x48)
    model = torch.jit.load(str(lama_file))
    padded = np.pad(photos[0], [(0, 2), (0, 3), (0, 0)], mode="symmetric").astype(np.float32) / 255
    region = np.pad(dilate(masks[0], 3), [(0, 2), (0, 3)], mode="symmetric").astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(padded).permute(2, 0, 1)[None], torch.from_numpy(region)[None, None])
    expected = np.rint(out[0].permute(1, 2, 0).numpy()[:30, :45] * 255).astype(np.uint8)
    inside = dilate(masks[0], 3)
    assert np.abs(results[0][inside].astype(int) - expected[inside]).max() <= 1


def test_lama_reference_loads_traced_files(tmp_path):
    from dreampainter.data.build.models.lama import LamaReference

    example = (torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 16, 16))
    torch.jit.trace(_TinyLama().eval(), example).save(str(tmp_path / "traced.pt"))  # big-lama.pt is traced
    photo, mask = _photo(20, 20), _mask(20, 20)
    result = LamaReference(tmp_path / "traced.pt", device="cpu", dilation=0)([photo], [mask])[0]
    assert result.shape == photo.shape and np.array_equal(result[mask == 0], photo[mask == 0])


def test_lama_reference_errors(lama_file, tmp_path):
    from dreampainter.data.build.models.lama import LamaReference

    with pytest.raises(MissingFileError, match="LaMa TorchScript model not found: .*big-lama.pt"):
        LamaReference(tmp_path / "big-lama.pt", device="cpu")
    with pytest.raises(InvalidInputError, match="not a TorchScript file"):
        LamaReference(_garbage(tmp_path), device="cpu")
    torch.save({"weight": torch.zeros(2)}, str(tmp_path / "best.ckpt"))  # a plain checkpoint, not TorchScript
    with pytest.raises(InvalidInputError, match="not a TorchScript file"):
        LamaReference(tmp_path / "best.ckpt", device="cpu")
    torch.jit.script(_OneInput()).save(str(tmp_path / "one.pt"))
    with pytest.raises(InvalidInputError, match=r"model\(image, mask\)"):
        LamaReference(tmp_path / "one.pt", device="cpu")
    with pytest.raises(InvalidInputError, match="dilation"):
        LamaReference(lama_file, device="cpu", dilation=-1)


# ------------------------------------------------------------------------------------ diffusers inpainting


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    from diffusers import StableDiffusionInpaintPipeline

    from dreampainter.toy.models import (
        build_clip_tokenizer,
        build_tiny_scheduler,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_tiny_vae,
    )

    folder = tmp_path_factory.mktemp("inpaint")
    pipe = StableDiffusionInpaintPipeline(
        vae=build_tiny_vae(),
        text_encoder=build_tiny_text_encoder(),
        tokenizer=build_clip_tokenizer(folder / "tokenizer_files"),
        unet=build_tiny_unet(),
        scheduler=build_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"


def test_working_size():
    from dreampainter.data.build.models.diffusers_inpaint import working_size

    assert working_size(1000, 500, 512) == (512, 256)
    assert working_size(300, 400, 512) == (384, 512)
    assert working_size(10, 1000, 64) == (8, 64)


def test_diffusers_reference_repaints_the_dilated_mask(inpaint_folder):
    from dreampainter.data.build.models.diffusers_inpaint import DiffusersInpaintReference

    reference = DiffusersInpaintReference(inpaint_folder, device="cpu", steps=2, dilation=2, resolution=32)
    photos = [_photo(40, 60), _photo(40, 60), _photo(33, 33)]
    masks = [_mask(40, 60), _mask(40, 60, (0, 10, 0, 10)), np.zeros((33, 33), np.uint8)]
    results = reference(photos, masks)
    assert len(results) == 3
    for photo, mask, result in zip(photos, masks, results):
        assert result.shape == photo.shape and result.dtype == np.uint8
        outside = ~dilate(mask, 2)
        assert np.array_equal(result[outside], photo[outside])
    assert np.array_equal(results[2], photos[2])
    assert not np.array_equal(results[0], photos[0])
    alone = reference([photos[1]], [masks[1]])[0]  # one generator per image: the batch does not matter
    assert np.abs(alone.astype(int) - results[1].astype(int)).max() <= 2


def test_diffusers_reference_errors(inpaint_folder, tmp_path):
    from dreampainter.data.build.models.diffusers_inpaint import DiffusersInpaintReference

    with pytest.raises(
        MissingFileError, match="diffusers inpainting pipeline not found: .*stable-diffusion-inpainting"
    ):
        DiffusersInpaintReference(tmp_path / "missing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="model_index.json"):
        DiffusersInpaintReference(tmp_path / "empty", device="cpu")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not a diffusers model_index.json"):
        DiffusersInpaintReference(tmp_path / "bad", device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(inpaint_folder, partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(MissingFileError, match="pipeline incomplete: .*partial"):
        DiffusersInpaintReference(partial, device="cpu")
    with pytest.raises(InvalidInputError, match="resolution: expected a multiple of 8"):
        DiffusersInpaintReference(inpaint_folder, device="cpu", resolution=30)
    with pytest.raises(InvalidInputError, match="dtype"):
        DiffusersInpaintReference(inpaint_folder, device="cpu", dtype="half")
    reference = DiffusersInpaintReference(inpaint_folder, device="cpu", dtype="bfloat16")
    assert reference.pipe.unet.dtype == torch.bfloat16 and reference.pipe.safety_checker is None


# ---------------------------------------------------------------------------------------------- BLIP

BLIP_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[DEC]",
    "a",
    "red",
    "shoe",
    "on",
    "white",
    "table",
]


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("blip")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(BLIP_WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    text = dict(
        vocab_size=len(BLIP_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, bos_token_id=5, sep_token_id=3, pad_token_id=0, encoder_hidden_size=32,
    )  # fmt: skip
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    )
    model.save_pretrained(str(folder / "model"))
    processor.save_pretrained(str(folder / "model"))
    return folder / "model"


def test_blip_captioner(blip_folder):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from dreampainter.data.build.models.blip import BlipCaptioner

    photos = [_photo(40, 50), _photo(64, 30), _photo(32, 32)]
    captions = BlipCaptioner(blip_folder, device="cpu", max_new_tokens=5, batch_size=2)(photos)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    model = BlipForConditionalGeneration.from_pretrained(str(blip_folder)).eval()
    processor = BlipProcessor.from_pretrained(str(blip_folder))
    with torch.no_grad():
        ids = model.generate(**processor(images=photos[:1], return_tensors="pt"), max_new_tokens=5)
    assert captions[0] == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert set(" ".join(captions).split()) <= set(BLIP_WORDS[6:])
    templated = BlipCaptioner(blip_folder, device="cpu", template="a {category}: {caption}", category="shoe")
    assert templated(photos[:1]) == [f"a shoe: {captions[0]}".strip()]


def test_blip_captioner_errors(blip_folder, tmp_path):
    from dreampainter.data.build.models.blip import BlipCaptioner

    with pytest.raises(
        MissingFileError, match="BLIP captioning model folder not found: .*blip-image-captioning"
    ):
        BlipCaptioner(tmp_path / "blip", device="cpu")
    with pytest.raises(InvalidInputError, match="uses {category} but no category"):
        BlipCaptioner(blip_folder, device="cpu", template="{category} {caption}")
    with pytest.raises(InvalidInputError, match="may only use"):
        BlipCaptioner(blip_folder, device="cpu", template="{caption} {colour}")
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(InvalidInputError, match="expected 'blip'"):
        BlipCaptioner(tmp_path / "sam", device="cpu")


# -------------------------------------------------------------------------------------------- Marian

EN = ["a red shoe on a white table", "a leather bag in a sunny room", "a bottle of perfume on marble"]
ZH = ["白色桌子上的红鞋", "阳光房间里的皮包", "大理石上的香水瓶"]


@pytest.fixture(scope="module")
def marian_folder(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder = tmp_path_factory.mktemp("marian")
    for name, corpus in (("source", EN), ("target", ZH)):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus * 4), model_writer=model, vocab_size=30, hard_vocab_limit=False,
            character_coverage=1.0, bos_id=-1, eos_id=1, unk_id=2, pad_id=-1, minloglevel=2,
        )  # fmt: skip
        (folder / f"{name}.spm").write_bytes(model.getvalue())
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for name in ("source", "target"):
        processor = spm.SentencePieceProcessor(model_file=str(folder / f"{name}.spm"))
        for i in range(processor.get_piece_size()):
            vocab.setdefault(processor.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = MarianTokenizer(
        str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"), "en", "zh"
    )
    config = MarianConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=2, eos_token_id=0, decoder_start_token_id=2, forced_eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    MarianMTModel(config).save_pretrained(str(folder / "model"))
    tokenizer.save_pretrained(str(folder / "model"))
    return folder / "model"


def test_marian_translator(marian_folder):
    from transformers import MarianMTModel, MarianTokenizer

    from dreampainter.data.build.models.marian import MarianTranslator

    texts = ["a red shoe", "", "a bottle on a white marble table", "a bag"]
    translated = MarianTranslator(marian_folder, device="cpu", max_new_tokens=6, batch_size=2)(texts)
    assert len(translated) == 4 and all(isinstance(t, str) for t in translated)
    assert translated[1] == ""
    model = MarianMTModel.from_pretrained(str(marian_folder)).eval()
    tokenizer = MarianTokenizer.from_pretrained(str(marian_folder))
    with torch.no_grad():
        ids = model.generate(**tokenizer(texts[:1], return_tensors="pt"), max_new_tokens=6)
    assert translated[0] == tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_marian_translator_errors(marian_folder, tmp_path):
    from dreampainter.data.build.models.marian import MarianTranslator

    with pytest.raises(MissingFileError, match="MarianMT model folder not found: .*opus-mt-en-zh"):
        MarianTranslator(tmp_path / "marian", device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(marian_folder, partial)
    (partial / "target.spm").unlink()
    with pytest.raises(MissingFileError, match="target.spm"):
        MarianTranslator(partial, device="cpu")
    with pytest.raises(InvalidInputError, match="list of strings"):
        MarianTranslator(marian_folder, device="cpu")("one string")


# ------------------------------------------------------------------------------------------ dotted paths


@pytest.mark.parametrize(
    "dotted",
    [
        "dreampainter.data.build.models.onnx_segmenter:OnnxSalientSegmenter",
        "dreampainter.data.build.models.sam:SamRefiner",
        "dreampainter.data.build.models.diffusers_inpaint:DiffusersInpaintReference",
        "dreampainter.data.build.models.lama:LamaReference",
        "dreampainter.data.build.models.blip:BlipCaptioner",
        "dreampainter.data.build.models.marian:MarianTranslator",
    ],
)
def test_components_resolve_by_dotted_path_and_take_path_and_device(dotted):
    import importlib
    import inspect

    module, _, name = dotted.partition(":")
    cls = getattr(importlib.import_module(module), name)
    parameters = inspect.signature(cls).parameters
    assert "path" in parameters and "device" in parameters and callable(cls)


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs").glob("build_*.yaml")))
def test_shipped_build_configs_give_their_model_components_valid_options(config):
    """Every model-backed section of the shipped build configs binds to its class's constructor."""
    import importlib
    import inspect

    import yaml

    from dreampainter.data.build.components import MODEL_COMPONENTS

    sections = yaml.safe_load(config.read_text())
    checked = 0
    for (stage, kind), target in MODEL_COMPONENTS.items():
        section = sections.get(stage) or {}
        if not isinstance(section, dict) or section.get("kind") != kind:
            continue
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        inspect.signature(cls).bind(**{k: v for k, v in section.items() if k != "kind"}, device="cpu")
        checked += 1
    assert checked or "lifestyle" not in config.name


def test_data_build_runs_every_model_kind_end_to_end(salient, sam_folder, lama_file, blip_folder, marian_folder, tmp_path):
    """``dreampainter data build`` with the model-backed kinds of the lifestyle recipe (ONNX masks refined by
    SAM, LaMa references, BLIP captions of the reference, Marian Chinese), each a tiny random model in its
    real format: every sample goes through every stage, and what is kept validates."""
    from dreampainter.data.build.config import BuildConfig
    from dreampainter.data.build.pipeline import build_dataset
    from dreampainter.data.shards.format import ShardIndex
    from dreampainter.data.shards.tar import iter_tar_samples
    from dreampainter.data.shards.validate import validate_shards
    from dreampainter.utils.config import config_from_dict

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for index in range(4):
        photo = np.full((48, 48, 3), 235, np.uint8)
        photo[12:36, 14:34] = rng.integers(20, 120, 3)  # a dark product on a light backdrop
        Image.fromarray(photo).save(tmp_path / "in" / f"photo{index}.png")
    _, dynamic, _ = salient
    config = config_from_dict(BuildConfig, {
        "mask": {"kind": "onnx", "path": str(dynamic), "input_size": 32},
        "refine": {"kind": "sam", "path": str(sam_folder)},
        "reference": {"kind": "lama", "path": str(lama_file), "dilation": 2},
        "prompt": {"kind": "blip", "path": str(blip_folder), "max_new_tokens": 5},
        "translate": {"kind": "marian", "path": str(marian_folder), "max_new_tokens": 5},
        "cleanup": {"keep_components_above": 0.0, "small_hole_share": 0.0, "soft_edge": 0.0},
        "filters": {"min_side": 16, "min_sharpness": 0.0, "min_mask_share": 0.0, "max_mask_share": 1.0,
                    "max_border_touch": 1.0, "min_binary_share": 0.0, "min_mask_confidence": 0.0,
                    "duplicate_distance": -1},
        "device": "cpu",
    }, "test")  # fmt: skip
    report = build_dataset(tmp_path / "in", config, tmp_path / "out", progress=False)
    assert report.num_inputs == 4 and report.num_kept + sum(report.dropped.values()) == 4, report.table()
    for stage in ("mask", "refine", "reference", "prompt"):  # the translation is timed with the prompts
        assert report.seconds.get(stage, 0) > 0, (stage, report.seconds)
    assert report.num_kept == 4, report.dropped_keys  # the filters are open: every sample goes through
    assert validate_shards(tmp_path / "out", progress=False).ok
    index = ShardIndex.load(tmp_path / "out")
    records = [json.loads(members["json"]) for shard in index.shards
               for _, members in iter_tar_samples(str(tmp_path / "out" / shard.name))]  # fmt: skip
    assert len(records) == 4 and all("prompt" in r and "prompt_zh" in r for r in records)
