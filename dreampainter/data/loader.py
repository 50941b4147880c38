"""The streaming DreamEcom loader: shards -> augmented, collated training batches.

Per sample (:func:`process_sample`) the loader produces

=========================  =================================================================
``pixel_values``           the photo, float (3, H, W) in [-1, 1]
``mask``                   inpainting mask, float (1, H, W) in {0, 1}: 1 = repaint = background
                           = NOT(product mask); the product mask is resized, thresholded at 127,
                           then optionally grown / shrunk / replaced by its bounding box
``masked_pixel_values``    ``pixel_values * (1 - mask)`` (diffusers' masked image for SD inpainting)
``product_mask``           float (1, H, W) in {0, 1}: 1 = product (= ``1 - mask``)
``reference_pixel_values`` the reference for the CLIP vision encoder, float (3, S, S), normalised
                           (see :func:`dreampainter.data.augment.prepare_reference`)
``prompt``                 str: English, Chinese or either per ``language`` (falls back to English)
``drop_text``              bool: the training step should drop the text condition
``drop_reference``         bool: ... and/or the reference (both True = drop both)
``key``, ``category``      str: the sample key and its ``category`` (``""`` when absent)
=========================  =================================================================

and a batch (:func:`collate`) stacks the tensors, keeps strings as lists, turns the flags into bool
tensors, and adds ``skipped``: ``{reason: count}`` of the samples its worker skipped since its previous
batch. :class:`DreamEcomLoader` sums those into ``loader.skips`` (a :class:`SkipCounter`); skips after a
worker's last batch arrive in a ``{"skips_only": True, "skipped": ...}`` record that it absorbs.

Determinism and exact resume. Shards are ordered by ``(seed, epoch)`` and split by rank, then by
worker; each worker's shuffle buffer and every sample's augmentation draw from RNGs seeded by
``(seed, epoch, ...)`` and the sample key, so a run is a pure function of its arguments. Batches are
planned from cheap header reads (sizes, buckets, truncation and JSON checks) before any pixel is
decoded, so ``resume_samples`` fast-forwards each worker by re-planning, not re-decoding. Resuming
exactly needs the same ``world_size``, ``num_workers`` and ``batch_size`` as the interrupted run.

Epoch length. ``epoch_mode="balanced"`` (default) gives every worker of every rank the same number of
batches (from the index's counts, or ``samples_per_epoch``), so DDP ranks never wait on each other
and resume is exact anywhere in the epoch; a worker that runs short (skips, bucket leftovers)
continues into a reshuffled next pass of its own shards. ``epoch_mode="exact"`` yields every sample
exactly once (evaluation, single process); workers then run dry at different points, so a resume
with several workers first plans (headers only) every worker's batch count to replay the
DataLoader's round-robin. ``resampled=True`` draws shards with replacement (endless without a count).

Distributed use: pass ``rank`` / ``world_size`` explicitly (``accelerator.process_index`` /
``num_processes``) and do not pass the loader through ``accelerator.prepare`` (that would shard it a
second time); ``len(loader)`` is the number of batches per rank and epoch in balanced mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext

from dreampainter.data import masks
from dreampainter.data.augment import (
    CLIP_MEAN,
    CLIP_STD,
    REFERENCE_MODES,
    apply_crop,
    plan_crop,
    prepare_reference,
    reference_decode_size,
    to_signed_unit,
)
from dreampainter.data.buckets import bucket_batches, make_buckets, nearest_bucket
from dreampainter.data.fastdecode import ImageHeader, decode_mask, decode_rgb, probe
from dreampainter.data.format import MASK_EXTENSION, META_EXTENSION, PHOTO_EXTENSIONS, REFERENCE_EXTENSIONS
from dreampainter.data.shardlist import (
    ShardSet,
    check_enough_shards,
    open_shard,
    resolve_shards,
    shard_order,
    split_shards,
)
from dreampainter.errors import DreamPainterError, InvalidInputError

logger = logging.getLogger(__name__)

LANGUAGES = ("en", "zh", "random")
EPOCH_MODES = ("balanced", "exact")
# What undecodable data raises (PIL, zlib, our decoders); anything else is a bug and propagates.
DECODE_ERRORS = (
    DreamPainterError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)
_ONE = torch.tensor(1.0)
SKIPS_ONLY = "skips_only"  # marks the record that carries a worker's trailing skip counts
TENSOR_KEYS = ("pixel_values", "mask", "masked_pixel_values", "product_mask", "reference_pixel_values")


@dataclass
class LoaderConfig:
    """Everything that shapes the samples and the epoch (the ``data`` section of a training config)."""

    resolution: int | tuple[int, int] = 512  # square side, or (height, width)
    buckets: bool | Sequence[Sequence[int]] | None = None  # True: make_buckets(resolution); or (h, w) list
    max_zoom: float = 1.0  # random zoom-in on top of the covering scale (the product always stays in)
    flip_prob: float = 0.5
    reference_size: int = 224
    reference_mode: str = "pad"  # "pad" (no distortion) | "crop"
    reference_mean: Sequence[float] = CLIP_MEAN
    reference_std: Sequence[float] = CLIP_STD
    reference_aligned: bool = False  # the reference is the photo's own background: flip it with the photo
    language: str = "en"  # "en" | "zh" | "random"
    p_drop_text: float = 0.05
    p_drop_reference: float = 0.05
    p_drop_both: float = 0.05
    mask_grow_px: int | Sequence[int] = 0  # dilate (>0) / erode (<0) the product mask; (lo, hi): random
    bbox_mask_prob: float = 0.0  # probability of using the product's bounding box as its mask
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # encoded samples held per worker (~memory); 0 disables sample shuffling
    resampled: bool = False  # endless: shards drawn with replacement
    epoch_mode: str = "balanced"  # "balanced": same number of batches on every rank/worker | "exact"
    samples_per_epoch: int | None = None  # epoch length over all ranks; overrides the index's counts
    drop_last: bool = True
    max_pixels: int | None = 64_000_000

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise InvalidInputError(f"data.language must be one of {LANGUAGES}, got {self.language!r}")
        if self.reference_mode not in REFERENCE_MODES:
            raise InvalidInputError(
                f"data.reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}"
            )
        if self.epoch_mode not in EPOCH_MODES:
            raise InvalidInputError(f"data.epoch_mode must be one of {EPOCH_MODES}, got {self.epoch_mode!r}")
        drops = (self.p_drop_text, self.p_drop_reference, self.p_drop_both)
        if min(drops) < 0 or sum(drops) > 1:
            raise InvalidInputError(f"data dropout probabilities must be >= 0 and sum to <= 1, got {drops}")
        if self.max_zoom < 1:
            raise InvalidInputError(f"data.max_zoom must be >= 1, got {self.max_zoom}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> LoaderConfig:
        """Build from a plain or OmegaConf mapping; unknown keys are an error (typos must not pass silently)."""
        try:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(values):
                values = OmegaConf.to_container(values, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a project dependency
            pass
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidInputError(f"unknown data config key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def size(self) -> tuple[int, int]:
        """The output (height, width) without buckets."""
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        height, width = self.resolution
        return int(height), int(width)

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of every bucket; one bucket (``size``) when buckets are off."""
        if self.buckets is True:
            return make_buckets(max(self.size))
        if self.buckets:
            return [(int(h), int(w)) for h, w in self.buckets]
        return [self.size]


class SkipCounter:
    """Skipped samples by reason, summed over workers (the loader fills it from each batch's ``skipped``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def update(self, counts: Mapping[str, int]) -> None:
        for reason, number in counts.items():
            self.counts[reason] += int(number)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, {self.as_dict()})"


class _SkipLog:
    """A worker's skip bookkeeping: counts since the last batch, and rate-limited warnings."""

    def __init__(self, worker: int, quiet: bool = False) -> None:
        self.worker, self.quiet = worker, quiet
        self.totals: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: object = "", number: int = 1) -> None:
        self.totals[reason] += number
        self.pending[reason] += number
        seen = self.totals[reason]
        if self.quiet:
            return
        if seen <= 5 or str(seen).rstrip("0") == "1":  # the first five, then at 10, 100, 1000, ...
            logger.warning(
                "skipped %s (%s): %s [worker %d, %d %s so far]",
                where,
                reason,
                detail,
                self.worker,
                seen,
                reason,
            )

    def take_pending(self) -> dict[str, int]:
        pending, self.pending = dict(self.pending), Counter()
        return pending


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class PlannedSample:
    """A sample that passed the cheap checks: its bytes, parsed JSON and upright image headers."""

    key: str
    url: str
    photo: bytes
    mask: bytes
    reference: bytes
    meta: dict[str, Any]
    photo_header: ImageHeader
    reference_header: ImageHeader
    pass_index: int = 0
    names: dict[str, str] = field(default_factory=dict)


def iter_tar_groups(url: str, log: _SkipLog, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream a tar shard as ``{"__key__", "__url__", suffix: bytes, ...}`` groups (WebDataset rules).

    A shard that cannot be opened or ends early is counted and logged; its complete samples are kept.
    """
    produced = 0
    try:
        stream = open_shard(url)
    except Exception as error:
        log.skip("unreadable_shard", url, error)
        return
    current: dict[str, Any] | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if not info.isreg():
                    continue
                data = archive.extractfile(info).read()
                archive.members = []  # streaming: do not keep every TarInfo
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None or info.name.startswith("__"):
                    continue
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        produced += 1
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                current[suffix.lower()] = data
        if current is not None:
            produced += 1
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        log.skip("truncated_tar", url, error)
        return
    if expected is not None and produced < expected:
        log.skip(
            "missing_samples", url, f"{produced} of {expected} samples in the index", expected - produced
        )


def _member(group: Mapping[str, Any], suffixes: Sequence[str], what: str) -> tuple[str, bytes]:
    for suffix in suffixes:
        if suffix in group:
            return suffix, group[suffix]
    raise _Skip("missing_member", f"no {what} member (.{'/.'.join(suffixes)})")


def inspect_sample(group: Mapping[str, Any], max_pixels: int | None = None) -> PlannedSample:
    """The cheap checks (members, JSON, prompt, headers, truncation, mask size); raises ``_Skip``."""
    key = group["__key__"]
    photo_ext, photo = _member(group, PHOTO_EXTENSIONS, "photo")
    _, mask = _member(group, (MASK_EXTENSION,), "mask")
    reference_ext, reference = _member(group, REFERENCE_EXTENSIONS, "reference")
    _, raw_meta = _member(group, (META_EXTENSION,), "json")
    try:
        meta = json.loads(raw_meta.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Skip("bad_json", f"{key}.json: {error}") from None
    if not isinstance(meta, dict):
        raise _Skip("bad_json", f"{key}.json: not a JSON object")
    prompt = meta.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Skip("empty_prompt", f"{key}.json: missing or empty 'prompt'")
    names = {
        "photo": f"{key}.{photo_ext}",
        "mask": f"{key}.{MASK_EXTENSION}",
        "reference": f"{key}.{reference_ext}",
    }
    try:
        photo_header = probe(photo, names["photo"], max_pixels)
        mask_header = probe(mask, names["mask"], max_pixels)
        reference_header = probe(reference, names["reference"], max_pixels)
    except InvalidInputError as error:
        reason = "truncated_image" if "truncated" in str(error) else "undecodable"
        raise _Skip(reason, str(error)) from None
    if mask_header.size != photo_header.size:
        raise _Skip("mask_size", f"{names['mask']} is {mask_header.size}, photo is {photo_header.size}")
    return PlannedSample(
        key, group["__url__"], photo, mask, reference, meta, photo_header, reference_header, names=names
    )


def _sample_rng(seed: int, epoch: int, item: PlannedSample) -> random.Random:
    return random.Random(f"sample/{seed}/{epoch}/{item.pass_index}/{item.key}")


def _choose_prompt(meta: Mapping[str, Any], language: str, rng: random.Random) -> str:
    english = meta["prompt"].strip()
    chinese = meta.get("prompt_zh")
    chinese = chinese.strip() if isinstance(chinese, str) else ""
    use_chinese = rng.random() < 0.5 if language == "random" else language == "zh"
    return chinese if use_chinese and chinese else english


def allocate_batch(
    batch_size: int, out_size: tuple[int, int], reference_size: int, shared: bool = False
) -> dict[str, torch.Tensor]:
    """Uninitialised batch tensors that :func:`process_sample` fills slot by slot (no stacking copy).

    ``shared=True`` (inside DataLoader workers) allocates in shared memory, as ``default_collate``
    does, so handing the batch to the main process does not copy it again.
    """
    height, width = out_size
    shapes = {
        "pixel_values": (3, height, width),
        "mask": (1, height, width),
        "masked_pixel_values": (3, height, width),
        "product_mask": (1, height, width),
        "reference_pixel_values": (3, reference_size, reference_size),
    }
    buffers = {}
    for name, shape in shapes.items():
        shape = (batch_size, *shape)
        if shared:
            numel = batch_size * shape[1] * shape[2] * shape[3]
            storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")
            buffers[name] = torch.empty(0).new(storage).resize_(shape)
        else:
            buffers[name] = torch.empty(shape)
    return buffers


def process_sample(
    item: PlannedSample,
    config: LoaderConfig,
    out_size: tuple[int, int],
    seed: int = 0,
    epoch: int = 0,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Decode and augment one planned sample to the per-sample dict (see the module docstring).

    ``out_size`` is ``(height, width)``. All randomness comes from ``(seed, epoch, pass, key)``.
    ``out``: per-sample views (e.g. ``allocate_batch(...)[name][i]``) to write the tensors into.
    """
    rng = _sample_rng(seed, epoch, item)
    out_h, out_w = out_size
    mask_full = decode_mask(item.mask, item.names.get("mask", "mask"))
    box = masks.bounding_box(mask_full, masks.MASK_THRESHOLD)
    plan = plan_crop(
        item.photo_header.size, (out_w, out_h), box, rng, max_zoom=config.max_zoom, flip_prob=config.flip_prob
    )
    photo = decode_rgb(
        item.photo, item.names.get("photo", "photo"), item.photo_header, min_size=plan.scaled_size
    )
    grow = config.mask_grow_px
    grow_px = rng.randint(int(grow[0]), int(grow[1])) if isinstance(grow, Sequence) else int(grow)
    use_box = rng.random() < config.bbox_mask_prob
    reference_size = reference_decode_size(
        item.reference_header.size, config.reference_size, config.reference_mode
    )
    reference = decode_rgb(
        item.reference, item.names.get("reference", "reference"), item.reference_header, reference_size
    )
    if config.reference_aligned and plan.flip:
        reference = reference.flip(-1)
    reference_pixel_values = prepare_reference(
        reference, config.reference_size, config.reference_mode, config.reference_mean, config.reference_std
    )
    if out is None:
        out = {name: tensor[0] for name, tensor in allocate_batch(1, out_size, config.reference_size).items()}
    product = out["product_mask"]
    product.copy_(apply_crop(mask_full, plan, fill=0)).gt_(masks.MASK_THRESHOLD)  # {0, 1} float, in place
    if grow_px:
        product.copy_(masks.grow(product, grow_px))
    if use_box:
        product.copy_(masks.box_mask(product))
    torch.sub(_ONE, product, out=out["mask"])  # inpainting mask = NOT(product)
    pixel_values = to_signed_unit(apply_crop(photo, plan, fill=127), out=out["pixel_values"])
    torch.mul(pixel_values, product, out=out["masked_pixel_values"])
    out["reference_pixel_values"].copy_(reference_pixel_values)
    prompt = _choose_prompt(item.meta, config.language, rng)
    draw = rng.random()
    p_text, p_ref, p_both = config.p_drop_text, config.p_drop_reference, config.p_drop_both
    both = p_text + p_ref <= draw < p_text + p_ref + p_both
    category = item.meta.get("category")
    return {
        **{name: out[name] for name in TENSOR_KEYS},
        "prompt": prompt,
        "drop_text": draw < p_text or both,
        "drop_reference": p_text <= draw < p_text + p_ref or both,
        "key": item.key,
        "category": category if isinstance(category, str) else "",
    }


def collate(
    samples: Sequence[Mapping[str, Any]], tensors: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Stack per-sample dicts into a batch: tensors stacked, strings as lists, flags as bool tensors.

    ``tensors``: the already-filled batch tensors when the samples were written into ``allocate_batch``.
    """
    if tensors is None:
        tensors = {name: torch.stack([s[name] for s in samples]) for name in TENSOR_KEYS}
    batch: dict[str, Any] = dict(tensors)
    for name in ("prompt", "key", "category"):
        batch[name] = [s[name] for s in samples]
    for name in ("drop_text", "drop_reference"):
        batch[name] = torch.tensor([bool(s[name]) for s in samples], dtype=torch.bool)
    return batch


class DreamEcomDataset(IterableDataset):
    """The per-rank stream of collated batches; each DataLoader worker reads its own shards.

    Use :func:`build_dataloader`; the dataset yields whole batches (DataLoader ``batch_size=None``).
    """

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epoch: int = 0,
        seed: int = 0,
        resume_samples: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"rank {rank} is outside world size {world_size}")
        if resume_samples < 0 or resume_samples % batch_size:
            raise InvalidInputError(
                f"resume_samples={resume_samples} must be a non-negative multiple of batch_size={batch_size} "
                "(batches consumed on this rank x batch_size)"
            )
        self.shards, self.config = shards, config
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = max(1, num_workers)
        self.epoch, self.seed = epoch, seed
        self.resume_batches = resume_samples // batch_size
        self.buckets = config.bucket_sizes()
        if not config.resampled:
            check_enough_shards(len(shards.urls), world_size, self.num_workers)
        self.batches_per_worker = self._batches_per_worker()
        if (
            self.batches_per_worker is not None
            and self.resume_batches > self.batches_per_worker * self.num_workers
        ):
            raise InvalidInputError(
                f"resume_samples={resume_samples} is past the end of the epoch "
                f"({self.batches_per_worker * self.num_workers * batch_size} samples per rank)"
            )

    def _batches_per_worker(self) -> int | None:
        config, readers = self.config, self.world_size * self.num_workers
        samples = config.samples_per_epoch
        if config.resampled:
            samples = samples if samples is not None else self.shards.num_samples
            return None if samples is None else max(1, -(-samples // (readers * self.batch_size)))
        if config.epoch_mode == "exact":
            return None
        if samples is not None:
            per_worker = samples // (readers * self.batch_size)
        elif self.shards.counts is not None:
            order = shard_order(len(self.shards.urls), self.seed, self.epoch, config.shuffle_shards)
            per_worker = (
                min(
                    sum(
                        self.shards.counts[i]
                        for i in split_shards(order, rank, self.world_size, worker, self.num_workers)
                    )
                    for rank in range(self.world_size)
                    for worker in range(self.num_workers)
                )
                // self.batch_size
            )
        else:
            raise InvalidInputError(
                f"{self.shards.source}: epoch_mode='balanced' needs sample counts: point the loader at the "
                "shards' index.json, set samples_per_epoch, or use epoch_mode='exact'"
            )
        if per_worker < 1:
            raise InvalidInputError(
                f"{self.shards.source}: too few samples for one batch of {self.batch_size} on each of "
                f"{self.world_size} rank(s) x {self.num_workers} worker(s)"
            )
        return per_worker

    def __len__(self) -> int:
        """Batches this rank yields per epoch (known in balanced and resampled-with-count modes)."""
        if self.batches_per_worker is None:
            raise TypeError("the epoch length is unknown in epoch_mode='exact' without an index")
        return self.batches_per_worker * self.num_workers

    def _resampled_shards(self, worker: int) -> Iterator[int]:
        """Endless shard indices drawn with replacement, seeded per (seed, epoch, rank, worker)."""
        rng = random.Random(f"resample/{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.num_workers}")
        while True:
            yield rng.randrange(len(self.shards.urls))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        consumed, next_worker = self._resume_position()
        # The DataLoader visits its workers round-robin from worker 0, the interrupted run would go on
        # with logical worker ``next_worker``: rotate the roles so that both orders coincide.
        worker = ((info.id if info is not None else 0) + next_worker) % self.num_workers
        log = _SkipLog(worker)
        skip = consumed[worker]
        for index, (bucket, items) in enumerate(self._planned_batches(worker, log)):
            if index < skip:
                log.take_pending()  # the interrupted run already reported these with batch ``index``
                continue
            out_size = self.buckets[bucket]
            buffers = allocate_batch(
                len(items), out_size, self.config.reference_size, shared=info is not None
            )
            samples = []
            for item in items:
                slot = {name: tensor[len(samples)] for name, tensor in buffers.items()}
                try:
                    samples.append(process_sample(item, self.config, out_size, self.seed, self.epoch, slot))
                except DECODE_ERRORS as error:  # one bad sample never kills a run (code bugs still raise)
                    log.skip("undecodable", f"{item.key} in {item.url}", error)
            if samples:
                batch = collate(samples, {name: tensor[: len(samples)] for name, tensor in buffers.items()})
                batch["skipped"] = log.take_pending()
                yield batch
        if log.pending:  # skips after this worker's last batch: a skips-only record the loader absorbs
            yield {SKIPS_ONLY: True, "skipped": log.take_pending()}

    def _planned_batches(self, worker: int, log: _SkipLog) -> Iterator[tuple[int, list[PlannedSample]]]:
        """``(bucket, samples)`` batches of one logical worker, planned from headers only."""
        batches = bucket_batches(
            self._planned_items(worker, log),
            lambda item: nearest_bucket(item.photo_header.size, self.buckets),
            self.batch_size,
            self.config.drop_last,
        )
        if self.batches_per_worker is not None:
            batches = islice(batches, self.batches_per_worker)
        return batches

    def _resume_position(self) -> tuple[list[int], int]:
        """Batches each logical worker had delivered after ``resume_batches``, and the worker due next.

        With equal-length workers (balanced / resampled) this is plain round-robin arithmetic. In
        exact mode workers run dry at different points, so every worker's batch count is planned
        (headers only, reading this rank's shards once per worker) and the round-robin is replayed.
        """
        workers, target = self.num_workers, self.resume_batches
        if self.batches_per_worker is not None or workers == 1 or target == 0:
            return [max(0, (target - w + workers - 1) // workers) for w in range(workers)], target % workers
        totals = [sum(1 for _ in self._planned_batches(w, _SkipLog(w, quiet=True))) for w in range(workers)]
        consumed, turn, served = [0] * workers, 0, 0
        while served < target and any(c < n for c, n in zip(consumed, totals)):
            if consumed[turn] < totals[turn]:
                consumed[turn] += 1
                served += 1
            turn = (turn + 1) % workers
        return consumed, turn

    def _planned_items(self, worker: int, log: _SkipLog) -> Iterator[PlannedSample]:
        """This worker's shards -> tar groups -> seeded shuffle buffer -> cheap checks, pass after pass."""
        if self.config.resampled:
            yield from self._items_of_pass(worker, 0, self._resampled_shards(worker), log)
        else:
            yield from self._items_by_pass(worker, log)

    def _items_by_pass(self, worker: int, log: _SkipLog) -> Iterator[PlannedSample]:
        config, num_shards = self.config, len(self.shards.urls)
        passes = count() if config.epoch_mode == "balanced" else range(1)
        for pass_index in passes:
            order = shard_order(num_shards, self.seed, self.epoch, config.shuffle_shards, pass_index)
            shards = split_shards(order, self.rank, self.world_size, worker, self.num_workers)
            produced = 0
            for item in self._items_of_pass(worker, pass_index, iter(shards), log):
                produced += 1
                yield item
            if produced == 0:
                return  # a pass without a single good sample: do not loop forever over broken data

    def _items_of_pass(
        self, worker: int, pass_index: int, shards: Iterator[int], log: _SkipLog
    ) -> Iterator[PlannedSample]:
        """One pass over ``shards``. Resampled mode is one endless pass in which each shard draw gets
        its own index, so a sample drawn twice is augmented differently (still deterministically)."""
        counts, resampled = self.shards.counts, self.config.resampled
        groups = (
            {**group, "__pass__": draw if resampled else pass_index}
            for draw, shard in enumerate(shards)
            for group in iter_tar_groups(
                self.shards.urls[shard], log, None if counts is None else counts[shard]
            )
        )
        if self.config.shuffle_buffer > 1:
            rng = random.Random(
                f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.num_workers}/{pass_index}"
            )
            buffer = self.config.shuffle_buffer
            groups = _shuffle(groups, bufsize=buffer, initial=buffer, rng=rng)
        for group in groups:
            try:
                item = inspect_sample(group, self.config.max_pixels)
            except _Skip as skip:
                log.skip(skip.reason, f"{group['__key__']} in {group['__url__']}", skip)
                continue
            item.pass_index = group["__pass__"]
            yield item


class DreamEcomLoader(DataLoader):
    """A torch DataLoader over :class:`DreamEcomDataset` that sums skipped-sample counts into ``skips``."""

    def __init__(self, dataset: DreamEcomDataset, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            self.skips.update(batch.get("skipped", {}))
            if not batch.get(SKIPS_ONLY):
                yield batch


def build_dataloader(
    source: Any,
    config: LoaderConfig | Mapping[str, Any] | None = None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    epoch: int = 0,
    seed: int = 0,
    resume_samples: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DreamEcomLoader:
    """A DataLoader yielding collated DreamEcom batches for one rank (see the module docstring).

    ``source``: folder, ``index.json``, brace pattern, URL or URL list. ``rank`` / ``world_size`` come
    from the caller (e.g. ``accelerator.process_index`` / ``num_processes``); do not also shard the
    loader with ``accelerator.prepare``. ``resume_samples``: samples this rank already consumed in
    ``epoch`` (batches x ``batch_size``). Build one loader per epoch (the epoch seeds the shard order).
    """
    if not isinstance(config, LoaderConfig):
        config = LoaderConfig.from_dict(config)
    dataset = DreamEcomDataset(
        resolve_shards(source),
        config,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        epoch=epoch,
        seed=seed,
        resume_samples=resume_samples,
    )
    extra: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    return DreamEcomLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, **extra)
