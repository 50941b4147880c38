"""The build runner: scan -> mask -> refine -> cleanup -> reference -> prompt -> shards.

Work is cut into chunks of ``output.samples_per_chunk`` inputs (in input order); chunk ``c`` belongs
to rank ``c % world_size`` and becomes one shard, ``shard-<c>-000000.tar``, written through the shard
writer's atomic rules (a hidden ``.partial`` file renamed when complete). A chunk is done when its
record ``.build/chunk-<c>.json`` exists (written after the shard), so a restarted build redoes only
unfinished chunks. Ranks meet once, in a gloo barrier after rank 0 has prepared the output folder;
after that they coordinate through the records. Near-duplicates are found over the whole input: every rank scans its chunks
(``.build/scan-<c>.json``), waits for all scans, and resolves duplicates the same way. Rank 0 waits for
every chunk, then writes ``index.json``, ``build_report.json`` and the contact sheets. The sample set
does not depend on the number of ranks (shards are even byte-identical); only which rank wrote which
shard differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dreampainter.data.build.components import build_component
from dreampainter.data.build.config import BuildConfig
from dreampainter.data.build.filters import (
    clean_mask_problem,
    colour_signature,
    find_duplicates,
    perceptual_hash,
    raw_mask_problem,
    scan_problem,
)
from dreampainter.data.build.inputs import BuildInput, read_files, read_inputs
from dreampainter.data.build.masks import clean_mask
from dreampainter.data.build.prompts import from_template, given_prompt
from dreampainter.data.build.report import BuildReport, write_contact_sheets
from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.checks import mask_problems
from dreampainter.data.shards.format import INDEX_FILENAME, EncodedSample, ShardIndex, ShardInfo
from dreampainter.data.shards.writer import ShardSetWriter
from dreampainter.errors import DreamPainterError, InvalidInputError
from dreampainter.utils.config import config_to_dict
from dreampainter.utils.io import atomic_write_json

STATE_DIR = ".build"
REPORT_FILENAME = "build_report.json"
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
SCAN_BATCH = 32
STAGES = ("scan", "decode", "mask", "refine", "cleanup", "reference", "prompt", "write")


@dataclass
class Work:
    """One input on its way through the stages."""

    item: BuildInput
    files: dict[str, bytes | None]
    photo: np.ndarray | None = None
    alpha: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)  # the upright photo's size before any downscale
    stored: tuple[bytes, str] | None = None  # original photo bytes kept as they are
    mask: np.ndarray | None = None
    confidence: float = 1.0
    reference: np.ndarray | None = None
    stored_reference: tuple[bytes, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    drop: str | None = None


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun / accelerate's environment; ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device(config: BuildConfig) -> str:
    if config.device != "auto":
        return config.device
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    except ImportError:
        pass
    return "cpu"


def _wait_for(paths: list[Path], timeout: float, what: str) -> None:
    start = time.monotonic()
    while not all(path.exists() for path in paths):
        if time.monotonic() - start > timeout:
            missing = next(path for path in paths if not path.exists())
            raise InvalidInputError(f"{missing}: still missing after {timeout:.0f} s ({what}); did a rank fail?")
        time.sleep(0.2)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------- scan


def _decode_error_reason(error: Exception) -> str:
    return "oversized" if "limit" in str(error) else "undecodable"


def _scan_chunk(items: list[BuildInput], config: BuildConfig) -> list[dict[str, Any]]:
    records = []
    files: dict[str, dict[str, bytes | None]] = {}
    for index, item in enumerate(items):
        if index % SCAN_BATCH == 0:  # read a few files at a time (one pass per shard for shard inputs)
            files = read_files(items[index : index + SCAN_BATCH])
        data = files.get(item.key, {}).get("photo")
        record: dict[str, Any] = {"key": item.key, "drop": None, "hash": None}
        if data is None:
            record["drop"] = "undecodable"
            records.append(record)
            continue
        try:
            image = load_image(data, f"photo {item.location}", max_pixels=config.filters.max_pixels)
        except DreamPainterError as error:
            record["drop"] = _decode_error_reason(error)
            records.append(record)
            continue
        record["drop"] = scan_problem(image, np.asarray(image), config.filters)
        if record["drop"] is None:
            record["hash"] = f"{perceptual_hash(image):016x}"
            record["colours"] = colour_signature(image)
        records.append(record)
    return records


# ----------------------------------------------------------------------------------- stages


def _fit(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _original(data: bytes, image: Image.Image) -> tuple[bytes, str] | None:
    """``(bytes, ext)`` when the photo can be stored as given: JPEG/PNG/WebP, RGB, upright, not resized."""
    try:
        with Image.open(io.BytesIO(data)) as raw:
            fmt, mode, size, orientation = raw.format, raw.mode, raw.size, raw.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - only the header matters here
        return None
    if fmt in KEPT_FORMATS and mode == "RGB" and size == image.size and orientation in (0, 1):
        return data, KEPT_FORMATS[fmt]
    return None


def _decode(work: Work, config: BuildConfig) -> None:
    data = work.files["photo"]
    assert data is not None
    image = load_image(data, f"photo {work.item.location}", keep_alpha=True, max_pixels=config.filters.max_pixels)
    work.size = image.size
    fitted = _fit(image, config.output.max_side)
    if fitted.mode == "RGBA":
        rgba = np.asarray(fitted).astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        work.alpha = np.asarray(fitted)[..., 3].copy()
        work.photo = np.clip(np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)), 0, 255).astype(np.uint8)
    else:
        work.photo = np.asarray(fitted.convert("RGB"))
        work.stored = _original(data, fitted) if fitted is image else None
    work.meta = dict(work.item.meta)


def _given_mask(work: Work, config: BuildConfig) -> None:
    assert work.photo is not None
    height, width = work.photo.shape[:2]
    data = work.files.get("mask")
    if data is None and work.alpha is None:
        work.drop = "missing_mask"
        return
    try:
        mask = load_mask(data, f"mask of {work.item.location}") if data is not None else work.alpha
    except DreamPainterError:
        work.drop = "bad_mask"
        return
    assert mask is not None
    if mask.shape != work.size[::-1]:  # the mask must fit the upright photo as given
        work.drop = "bad_mask"
        return
    if mask.shape != (height, width):  # the photo was downscaled (output.max_side)
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.BOX))
    work.mask, work.confidence = mask, 1.0


def _given_reference(work: Work) -> None:
    data = work.files.get("reference")
    if data is None:
        work.drop = "missing_reference"
        return
    try:
        image = load_image(data, f"reference of {work.item.location}")
    except DreamPainterError:
        work.drop = "bad_reference"
        return
    work.reference = np.asarray(image)
    work.stored_reference = _original(data, image)


def _call(component: Any, works: list[Work], *args: Any) -> list[Any]:
    """Call a component, passing ``keys=`` to those that ask for them (the toy world's)."""
    if getattr(component, "wants_keys", False):
        results = list(component(*args, keys=[work.item.key for work in works]))
    else:
        results = list(component(*args))
    if len(results) != len(works):
        raise InvalidInputError(
            f"component {type(component).__name__}: returned {len(results)} results for a batch of {len(works)}"
        )
    return results


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _encode_image(array: np.ndarray, fmt: str, quality: int) -> tuple[bytes, str]:
    if fmt == "png":
        return _encode_png(array), "png"
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue(), "jpg"


class Stages:
    """The configured components, and one batch's trip through them."""

    def __init__(self, config: BuildConfig) -> None:
        device = _device(config)
        self.config = config
        self.mask = build_component("mask", dict(config.mask), device)
        self.refine = build_component("refine", dict(config.refine), device)
        self.reference = build_component("reference", dict(config.reference), device)
        self.prompt = build_component("prompt", dict(config.prompt), device)
        self.translate = build_component("translate", dict(config.translate), device)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.bar: tqdm | None = None

    def _timed(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - start
        if self.bar is not None:  # the build bar shows the stage that just ran and its share of the time
            total = sum(self.seconds.values()) or 1.0
            self.bar.set_postfix_str(f"{stage} ({100 * self.seconds[stage] / total:.0f}% of the time)", refresh=False)
        return now

    def run(self, works: list[Work]) -> list[EncodedSample]:
        config = self.config
        start = time.perf_counter()
        for work in works:
            _decode(work, config)
        start = self._timed("decode", start)

        live = [work for work in works if work.drop is None]
        if self.mask is None:
            for work in live:
                _given_mask(work, config)
        elif live:
            for work, (mask, confidence) in zip(live, _call(self.mask, live, [w.photo for w in live])):
                work.mask, work.confidence = np.asarray(mask, dtype=np.uint8), float(confidence)
        for work in live:
            if work.drop is None:
                work.drop = raw_mask_problem(work.mask, work.confidence, config.filters)
        start = self._timed("mask", start)

        live = [work for work in works if work.drop is None]
        if self.refine is not None and live:
            refined = _call(self.refine, live, [w.photo for w in live], [w.mask for w in live])
            for work, mask in zip(live, refined):
                work.mask = np.asarray(mask, dtype=np.uint8)
        start = self._timed("refine", start)

        for work in live:
            work.mask = clean_mask(work.photo, work.mask, config.cleanup)
            work.drop = clean_mask_problem(work.mask, config.filters)
            if work.drop is None and mask_problems(work.mask):
                work.drop = "mask_quality"
        start = self._timed("cleanup", start)

        live = [work for work in works if work.drop is None]
        if self.reference is None:
            for work in live:
                _given_reference(work)
        elif live:
            made = _call(self.reference, live, [w.photo for w in live], [w.mask for w in live])
            for work, reference in zip(live, made):
                work.reference = np.asarray(reference, dtype=np.uint8)
        start = self._timed("reference", start)

        live = [work for work in works if work.drop is None]
        self._prompts(live)
        start = self._timed("prompt", start)

        samples = [self._encode(work) for work in works if work.drop is None]
        self._timed("write", start)
        return samples

    def _prompts(self, live: list[Work]) -> None:
        if self.prompt is not None and live:
            results = _call(self.prompt, live, [w.reference for w in live])
            for work, result in zip(live, results):
                if isinstance(result, dict):  # a component that knows the whole record (the toy world's)
                    work.meta.update(result)
                else:
                    work.meta["prompt"] = from_template(self.config.prompt_template, str(result), work.meta)
        for work in live:
            prompt = given_prompt(work.meta)
            if prompt is None:
                work.drop = "missing_prompt"
            else:
                work.meta["prompt"] = prompt
        todo = [w for w in live if w.drop is None and not isinstance(w.meta.get("prompt_zh"), str)]
        if self.translate is not None and todo:
            for work, text in zip(todo, _call(self.translate, todo, [w.meta["prompt"] for w in todo])):
                work.meta["prompt_zh"] = str(text).strip()

    def _encode(self, work: Work) -> EncodedSample:
        output = self.config.output
        assert work.photo is not None and work.mask is not None and work.reference is not None
        photo, photo_ext = work.stored or _encode_image(work.photo, "jpg", output.jpeg_quality)
        reference, reference_ext = work.stored_reference or _encode_image(
            work.reference, output.reference_format, output.jpeg_quality
        )
        return EncodedSample(work.item.key, photo, photo_ext, _encode_png(work.mask), reference, reference_ext, work.meta)


# ----------------------------------------------------------------------------------- chunks


def _build_chunk(
    number: int, items: list[BuildInput], drops: dict[str, str], stages: Stages, out_dir: Path, bar: tqdm
) -> dict[str, Any]:
    config = stages.config
    before = dict(stages.seconds)
    dropped = [[item.key, drops[item.key]] for item in items if item.key in drops]
    live = [item for item in items if item.key not in drops]
    writer = ShardSetWriter(
        out_dir, max_samples_per_shard=len(items) or 1, max_bytes=None, prefix=f"shard-{number:06d}"
    )
    kept: list[str] = []
    try:
        for begin in range(0, len(live), config.batch_size):
            batch = live[begin : begin + config.batch_size]
            start = time.perf_counter()
            files = read_files(batch)
            works = [Work(item, files[item.key]) for item in batch]
            stages.seconds["decode"] += time.perf_counter() - start
            samples = stages.run(works)
            start = time.perf_counter()
            for sample in samples:
                writer.write(sample)
                kept.append(sample.key)
            stages.seconds["write"] += time.perf_counter() - start
            dropped += [[work.item.key, work.drop] for work in works if work.drop is not None]
            bar.update(len(batch))
        start = time.perf_counter()
        shards = writer.close()
        stages.seconds["write"] += time.perf_counter() - start
    except BaseException:
        writer.abort()
        raise
    bar.update(len(items) - len(live))
    order = {item.key: index for index, item in enumerate(items)}
    return {
        "chunk": number,
        "num_inputs": len(items),
        "shards": [vars(shard) for shard in shards],
        "kept": kept,
        "dropped": sorted(dropped, key=lambda entry: order[entry[0]]),
        "seconds": {stage: stages.seconds[stage] - before[stage] for stage in STAGES},
    }


def _fingerprint(config: BuildConfig, items: list[BuildInput]) -> str:
    data = json.dumps(
        {"config": config_to_dict(config), "inputs": [[i.key, i.photo, i.mask, i.reference, i.shard] for i in items]},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _barrier(world: int, timeout: float) -> bool:
    """Wait for every rank (gloo over torchrun's / accelerate's rendezvous); True if this call set it up."""
    if world <= 1:
        return False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    dist.barrier()
    return created


def _prepare_out(out_dir: Path, fingerprint: str, rank: int, world: int, overwrite: bool, timeout: float) -> Path:
    state_dir = out_dir / STATE_DIR
    state = state_dir / "state.json"
    if rank == 0:
        if out_dir.exists() and not out_dir.is_dir():
            raise InvalidInputError(f"output folder {out_dir}: exists and is not a folder")
        if overwrite:
            for path in [out_dir / INDEX_FILENAME, out_dir / REPORT_FILENAME, *out_dir.glob("shard-*.tar"),
                         *out_dir.glob(".shard-*.partial"), *out_dir.glob("contact_*.png")]:  # fmt: skip
                path.unlink(missing_ok=True)
            shutil.rmtree(state_dir, ignore_errors=True)
        if (out_dir / INDEX_FILENAME).exists():
            raise InvalidInputError(f"output folder {out_dir}: already holds a built shard set; pass --overwrite")
        if state.exists() and _read_json(state).get("fingerprint") != fingerprint:
            raise InvalidInputError(
                f"{state}: a build with another config or input was started here; pass --overwrite to restart"
            )
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state, {"fingerprint": fingerprint})
    created = _barrier(world, timeout)  # the other ranks start once rank 0 has (re)set the folder
    if rank != 0 and (not state.exists() or _read_json(state).get("fingerprint") != fingerprint):
        raise InvalidInputError(f"{state}: rank 0 did not start this build")
    if created:
        import torch.distributed as dist

        dist.destroy_process_group()
    return state_dir


def build_dataset(
    source: str | os.PathLike,
    config: BuildConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildReport | None:
    """Build validated shards + ``index.json`` + ``build_report.json`` in ``out_dir``.

    Returns the report on rank 0 (or a single process) and None on the other ranks.
    """
    rank, world = distributed_rank()
    out_dir = Path(out_dir)
    items = read_inputs(source)
    timeout = config.output.wait_timeout_s
    state_dir = _prepare_out(out_dir, _fingerprint(config, items), rank, world, overwrite, timeout)
    size = config.output.samples_per_chunk
    chunks = [items[begin : begin + size] for begin in range(0, len(items), size)]
    mine = [number for number in range(len(chunks)) if number % world == rank]
    quiet = not progress or rank != 0

    scan_paths = [state_dir / f"scan-{number:06d}.json" for number in range(len(chunks))]
    todo = [number for number in mine if not scan_paths[number].exists()]
    with tqdm(total=sum(len(chunks[n]) for n in todo), desc="scan", unit="photo", disable=quiet) as bar:
        for number in todo:
            start = time.perf_counter()
            records = _scan_chunk(chunks[number], config)
            atomic_write_json(scan_paths[number], {"records": records, "seconds": time.perf_counter() - start})
            bar.update(len(chunks[number]))
    _wait_for(scan_paths, timeout, "the other ranks' scans")
    scans = [_read_json(path) for path in scan_paths]
    drops = {r["key"]: r["drop"] for scan in scans for r in scan["records"] if r["drop"] is not None}
    hashes = [(r["key"], int(r["hash"], 16)) for scan in scans for r in scan["records"] if r["hash"] is not None]
    colours = {r["key"]: r["colours"] for scan in scans for r in scan["records"] if r.get("colours")}
    duplicates = find_duplicates(hashes, config.filters.duplicate_distance, colours)
    drops.update(dict.fromkeys(duplicates, "duplicate"))

    chunk_paths = [state_dir / f"chunk-{number:06d}.json" for number in range(len(chunks))]
    todo = [number for number in mine if not chunk_paths[number].exists()]
    if todo:
        stages = Stages(config)
        with tqdm(total=sum(len(chunks[n]) for n in todo), desc="build", unit="photo", disable=quiet) as bar:
            stages.bar = bar
            for number in todo:
                record = _build_chunk(number, chunks[number], drops, stages, out_dir, bar)
                atomic_write_json(chunk_paths[number], record)
    if rank != 0:
        return None
    _wait_for(chunk_paths, timeout, "the other ranks' chunks")
    records = [_read_json(path) for path in chunk_paths]
    shards = [ShardInfo(**shard) for record in records for shard in record["shards"]]
    for path, record in zip(chunk_paths, records):
        if any(not (out_dir / shard["name"]).is_file() for shard in record["shards"]):
            path.unlink()  # the next run rebuilds this chunk
            raise InvalidInputError(f"{out_dir}: a shard of chunk {record['chunk']} is gone; run the build again")
    listed = {shard.name for shard in shards}
    for path in [*out_dir.glob("shard-*.tar"), *out_dir.glob(".shard-*.partial")]:
        if path.name not in listed:
            path.unlink()
    report = BuildReport.from_records(str(source), scans, records, duplicates, world)
    report.save(out_dir / REPORT_FILENAME)
    write_contact_sheets(out_dir, items, records, config.output, progress=not quiet)
    index = ShardIndex(shards=shards, meta={"source": "data build", "input": str(source)})
    index.save(out_dir / INDEX_FILENAME)  # last: its presence means the set is complete
    return report
