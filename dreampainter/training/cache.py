"""Latent caching: encode the training set once, then train steps that run only the UNet.

:func:`cache_latents` makes one pass over the training shards with the training loader (epoch 0,
so each sample's augmentation, crop, flip, mask growth and prompt choice are those of epoch 0 and
stay **fixed** for every epoch of a cached run) and stores per sample what
:class:`~dreampainter.training.step.StepInputs` holds before dropout:

=======================  ===============================================================
``latent_mean`` / ``_std``  VAE posterior of the photo, scaled (``encode_latent_distribution``)
``masked_mean`` / ``_std``  ... of the masked photo
``mask``                    the inpainting mask at latent size (1 = repaint)
``text_embeds``             the prompt's CLIP text tokens
``pooled_text_embeds``      SDXL only: the pooled text embedding
``time_ids``                SDXL only: the micro-conditioning (original size, crop, target size)
``reference_features``      what the adapter's projection consumes (stage 2, decoupled / both)
``reference_latents``       the reference's VAE posterior mean (stage 2, in_context / both)
=======================  ===============================================================

plus, once, what a dropped prompt becomes (``step.empty_text``). Latents are still *sampled* from the stored posterior
at every step (same draws as the uncached path), so only the augmentation is frozen.

Layout of a cache folder: ``chunk-<rank>-<n>.safetensors`` (rows of samples sharing one latent
size), ``part-<rank>.json`` (each rank's chunks), ``empty_prompt.safetensors`` and ``index.json``
(written last: a folder without it is not a cache). The index records a fingerprint of every
component that produced it (config and weights, in the precision they ran in), so a run whose VAE,
text encoder, tokenizer or reference encoder differ refuses the cache instead of training on stale
inputs. Under ``accelerate launch`` each rank caches its own shards; the index lists every part.

:class:`LatentCache` reads it back: all cached samples in a per-``(seed, epoch)`` order, split by
rank, batched within one latent size, with dropout flags drawn per ``(seed, epoch, sample)`` with the
loader's probabilities, and exact resume by samples consumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dreampainter.data.loading.buckets import bucket_batches
from dreampainter.data.loading.loader import LoaderConfig, SkipCounter, build_dataloader
from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.models import reference_features
from dreampainter.models.backbones import TextConditions
from dreampainter.training.config import TrainConfig
from dreampainter.training.in_context import REFERENCE_LATENTS_NAME, cache_fields
from dreampainter.training.step import (
    StepInputs,
    batch_time_ids,
    condition_reference,
    drop_masks,
    empty_text,
    encode_latent_distribution,
    encode_text,
    latent_mask,
    select_text,
)
from dreampainter.utils import (
    TORCH_DTYPES,
    atomic_path,
    atomic_write_json,
    mixed_precision_dtype,
    module_fingerprint,
    use_cpu,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INDEX_NAME = "index.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
LATENT_NAMES = ("latent_mean", "latent_std", "masked_mean", "masked_std", "mask", "text_embeds")
TEXT_PART_NAMES = ("pooled_text_embeds", "time_ids")  # cached when the backbone has them (SDXL)
REFERENCE_NAME = "reference_features"
MAX_OPEN_CHUNKS = 128
# Loader fields that change what is cached (a run with other values trains on the cached ones).
GEOMETRY_FIELDS = (
    "resolution", "buckets", "max_zoom", "flip_prob", "reference_size", "reference_mode", "reference_mean",
    "reference_std", "reference_aligned", "language", "mask_grow_px", "bbox_mask_prob",
)


# --------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    payload = {"vocab": vocab, "max_length": tokenizer.model_max_length, "class": type(tokenizer).__name__}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def components_fingerprint(parts, with_reference: bool) -> dict[str, str]:
    """Per component (vae, text encoder(s), tokenizer(s)[, reference_encoder]) fingerprints."""
    prints = {
        "vae": module_fingerprint(parts.vae),
        "text_encoder": module_fingerprint(parts.text_encoder),
        "tokenizer": tokenizer_fingerprint(parts.tokenizer),
    }
    if getattr(parts, "text_encoder_2", None) is not None:
        prints["text_encoder_2"] = module_fingerprint(parts.text_encoder_2)
        prints["tokenizer_2"] = tokenizer_fingerprint(parts.tokenizer_2)
    if with_reference:
        prints["reference_encoder"] = module_fingerprint(parts.reference_encoder)
    return prints


# --------------------------------------------------------------------------- writing


def _cache_loader_config(config: TrainConfig) -> LoaderConfig:
    """The run's loader settings, in "every sample once" mode (order does not matter for a cache)."""
    return dataclasses.replace(
        config.data.loader, epoch_mode="exact", drop_last=False, shuffle_buffer=0, resampled=False, samples_per_epoch=None
    )


@torch.no_grad()
def encode_batch(batch: Mapping[str, Any], parts, adapter_config, device) -> dict[str, torch.Tensor]:
    """A loader batch -> the per-sample tensors a cached step needs (before dropout), on ``device``."""
    latent_mean, latent_std = encode_latent_distribution(parts.vae, batch["pixel_values"].to(device))
    masked_mean, masked_std = encode_latent_distribution(parts.vae, batch["masked_pixel_values"].to(device))
    latent_size = tuple(latent_mean.shape[-2:])
    text = encode_text(parts, batch["prompt"])
    encoded = {
        "latent_mean": latent_mean.float(),
        "latent_std": latent_std.float(),
        "masked_mean": masked_mean.float(),
        "masked_std": masked_std.float(),
        "mask": latent_mask(batch["mask"].to(device), latent_size),
        "text_embeds": text.tokens.float(),
    }
    if text.pooled is not None:
        encoded["pooled_text_embeds"] = text.pooled.float()
    time_ids = batch_time_ids(parts, batch)
    if time_ids is not None:
        encoded["time_ids"] = time_ids.to(device)
    if adapter_config is not None and adapter_config.decoupled:
        output = parts.reference_encoder(batch["reference_pixel_values"].to(device))
        encoded[REFERENCE_NAME] = reference_features(output, adapter_config).float()
    return encoded


class _ChunkWriter:
    """Rows grouped by latent size; each group is flushed as a safetensors chunk of ``chunk_size`` rows."""

    def __init__(self, folder: Path, rank: int, chunk_size: int, dtype: torch.dtype) -> None:
        self.folder, self.rank, self.chunk_size, self.dtype = folder, rank, chunk_size, dtype
        self.pending: dict[tuple[int, ...], list[tuple[str, dict[str, torch.Tensor]]]] = {}
        self.chunks: list[dict[str, Any]] = []

    def add(self, key: str, row: dict[str, torch.Tensor]) -> None:
        shape = tuple(row["latent_mean"].shape)
        rows = self.pending.setdefault(shape, [])
        rows.append((key, {name: tensor.to(device="cpu", dtype=self.dtype) for name, tensor in row.items()}))
        if len(rows) == self.chunk_size:
            self._flush(shape)

    def close(self) -> list[dict[str, Any]]:
        for shape in sorted(self.pending):
            self._flush(shape)
        return self.chunks

    def _flush(self, shape: tuple[int, ...]) -> None:
        rows = self.pending.pop(shape)
        name = f"chunk-{self.rank:05d}-{len(self.chunks):06d}.safetensors"
        tensors = {field: torch.stack([row[field] for _, row in rows]).contiguous() for field in rows[0][1]}
        with atomic_path(self.folder / name) as temporary:
            save_file(tensors, str(temporary))
        self.chunks.append({"file": name, "latent_shape": list(shape), "keys": [key for key, _ in rows]})


def cache_latents(
    config: TrainConfig, out_dir: str | os.PathLike, *, dtype: str = "float32", chunk_size: int = 256,
    batch_size: int | None = None, progress: bool = True,
) -> Path:
    """Encode ``config.data.train`` once into a latent cache in ``out_dir``; returns the index path.

    The frozen encoders run in the precision training would use (``train.mixed_precision``); ``dtype``
    is the storage type (float32 reproduces the uncached loss exactly; float16/bfloat16 halve the size).
    Every process of an ``accelerate launch`` caches its rank's shards.
    """
    from accelerate import PartialState

    from dreampainter.training.components import load_components

    if dtype not in TORCH_DTYPES:
        raise InvalidInputError(f"cache dtype must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
    if chunk_size < 1:
        raise InvalidInputError(f"cache chunk_size must be >= 1, got {chunk_size}")
    if not config.data.train:
        raise InvalidInputError("config data.train is not set: the latent cache encodes the training shards")
    folder = Path(out_dir)
    # As Accelerator does under `accelerate launch --cpu`; without a GPU, torchrun-style ranks use gloo.
    state = PartialState(cpu=use_cpu())
    if state.is_main_process:
        if (folder / INDEX_NAME).exists():
            raise InvalidInputError(f"{folder} already holds a latent cache ({INDEX_NAME}); choose another --out or delete it")
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("chunk-*.safetensors"), *folder.glob("part-*.json"), *folder.glob(".*.tmp")]:
            stale.unlink()
    state.wait_for_everyone()

    parts = load_components(config)
    device, weight_dtype = state.device, mixed_precision_dtype(config.train.mixed_precision)
    stage = config.run.stage
    adapter_config = parts.unet.reference_adapter_config if stage == 2 else None
    parts.unet = None  # not needed here: free its memory
    for module in parts.frozen_encoders():
        module.requires_grad_(False).to(device=device, dtype=weight_dtype).eval()

    loader = build_dataloader(
        config.data.train, _cache_loader_config(config), batch_size=batch_size or config.train.batch_size,
        rank=state.process_index, world_size=state.num_processes, num_workers=config.data.num_workers,
        epoch=0, seed=config.run.seed,
    )
    writer = _ChunkWriter(folder, state.process_index, chunk_size, TORCH_DTYPES[dtype])
    count = 0
    with tqdm(desc=f"caching latents (rank {state.process_index})", unit="sample", disable=not progress) as bar:
        for batch in loader:
            encoded = encode_batch(batch, parts, adapter_config, device)
            encoded.update(cache_fields(batch, parts, adapter_config, _cache_loader_config(config), device))
            for row, key in enumerate(batch["key"]):
                writer.add(key, {name: tensor[row] for name, tensor in encoded.items()})
            count += len(batch["key"])
            bar.update(len(batch["key"]))
    part = {"rank": state.process_index, "num_samples": count, "skipped": loader.skips.as_dict(), "chunks": writer.close()}
    atomic_write_json(folder / f"part-{state.process_index:05d}.json", part, indent=1)

    if state.is_main_process:
        empty = empty_text(parts)
        tensors = {"text_embeds": empty.tokens}
        if empty.pooled is not None:
            tensors["pooled_text_embeds"] = empty.pooled
        with atomic_path(folder / EMPTY_PROMPT_NAME) as temporary:
            save_file({k: v.float().cpu().to(TORCH_DTYPES[dtype]).contiguous() for k, v in tensors.items()}, str(temporary))
        fingerprint = components_fingerprint(parts, with_reference=adapter_config is not None)
    state.wait_for_everyone()
    index_path = folder / INDEX_NAME
    if state.is_main_process:
        part_names = [f"part-{rank:05d}.json" for rank in range(state.num_processes)]
        parts_data = [json.loads((folder / name).read_text()) for name in part_names]
        index = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "weight_dtype": str(weight_dtype).removeprefix("torch."),
            "dtype": dtype,
            "reference_feature_type": None if adapter_config is None or not adapter_config.decoupled else adapter_config.feature_type,
            "reference_latents": adapter_config is not None and adapter_config.in_context,
            "text_parts": list(TEXT_PART_NAMES) if parts.backbone.uses_pooled_text else [],
            "source": str(config.data.train),
            "seed": int(config.run.seed),
            "loader": dataclasses.asdict(_cache_loader_config(config)),
            "num_samples": sum(p["num_samples"] for p in parts_data),
            "skipped": {k: sum(p["skipped"].get(k, 0) for p in parts_data) for p in parts_data for k in p["skipped"]},
            "parts": part_names,
            "chunks": [chunk for p in parts_data for chunk in p["chunks"]],
        }
        if index["num_samples"] == 0:
            raise InvalidInputError(f"{config.data.train}: no sample could be cached (skipped: {index['skipped']})")
        atomic_write_json(index_path, index, indent=1)
    state.wait_for_everyone()
    return index_path


# --------------------------------------------------------------------------- reading


class LatentCache:
    """A cache folder made by :func:`cache_latents`: its index, sample locations, and batched reads."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        if not index_path.exists():
            raise MissingFileError(
                f"data.cache: {index_path} not found (make the cache with `dreampainter cache-latents --config X.yaml "
                f"--out {self.folder}`; an interrupted cache run leaves no index)"
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != CACHE_FORMAT:
            raise InvalidInputError(f"{index_path}: cache format {self.index.get('format')}, expected {CACHE_FORMAT}")
        self.keys: list[str] = []
        self.locations: list[tuple[int, int]] = []  # (chunk, row) per sample
        self.shape_of: list[int] = []  # a shape-group id per sample (batches never mix latent sizes)
        shapes: dict[tuple[int, ...], int] = {}
        for chunk_id, chunk in enumerate(self.index["chunks"]):
            group = shapes.setdefault(tuple(chunk["latent_shape"]), len(shapes))
            for row, key in enumerate(chunk["keys"]):
                self.keys.append(key)
                self.locations.append((chunk_id, row))
                self.shape_of.append(group)
        self._handles: OrderedDict[int, Any] = OrderedDict()  # open chunk files, least recently used first

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_reference_features(self) -> bool:
        return self.index.get("reference_feature_type") is not None

    def check_compatible(self, parts, stage: int) -> None:
        """Refuse a cache made with other components (or precision) than this run's, naming which."""
        adapter = parts.unet.reference_adapter_config if stage == 2 else None
        if adapter is not None and adapter.in_context and not self.index.get("reference_latents"):
            raise InvalidInputError(
                f"data.cache {self.folder} has no reference latents (made for reference_mode decoupled or stage 1): "
                "re-run cache-latents with this config"
            )
        decoupled = adapter is not None and adapter.decoupled
        if decoupled and not self.has_reference_features:
            raise InvalidInputError(
                f"data.cache {self.folder} has no reference features (made for stage 1): re-run cache-latents "
                "with the stage-2 config"
            )
        if decoupled:
            wanted = parts.unet.reference_adapter_config.feature_type
            if wanted != self.index["reference_feature_type"]:
                raise InvalidInputError(
                    f"data.cache {self.folder} holds '{self.index['reference_feature_type']}' reference features, "
                    f"this run's adapter projection consumes '{wanted}': re-run cache-latents with this config"
                )
        run_dtype = str(parts.vae.dtype).removeprefix("torch.")
        current = components_fingerprint(parts, with_reference=stage == 2)
        for name, value in current.items():
            cached = self.index["fingerprint"].get(name)
            if cached != value:
                precision = ""
                if run_dtype != self.index["weight_dtype"]:
                    precision = (
                        f"; it was also encoded in {self.index['weight_dtype']}, this run uses {run_dtype} "
                        "(train.mixed_precision must match)"
                    )
                raise InvalidInputError(
                    f"data.cache {self.folder} is stale: it was made with a different {name} "
                    f"(fingerprint {str(cached)[:12]}, this run's {value[:12]}){precision}; re-run "
                    "`dreampainter cache-latents` with this run's config and model.pretrained"
                )

    def warn_if_loader_differs(self, loader_config: LoaderConfig) -> None:
        cached = self.index.get("loader", {})
        current = dataclasses.asdict(loader_config)
        differing = [
            name for name in GEOMETRY_FIELDS if json.dumps(cached.get(name)) != json.dumps(current.get(name))
        ]
        if differing:
            logger.warning(
                "data.cache %s was made with other data.loader settings for %s: training uses the cached ones",
                self.folder, ", ".join(differing),
            )

    @property
    def text_part_names(self) -> tuple[str, ...]:
        """The per-sample text parts beyond the tokens that this cache holds (SDXL's)."""
        return tuple(self.index.get("text_parts", ()))

    def empty_text_embeds(self) -> TextConditions:
        with safe_open(str(self.folder / EMPTY_PROMPT_NAME), framework="pt") as handle:
            names = set(handle.keys())
            pooled = handle.get_tensor("pooled_text_embeds").float() if "pooled_text_embeds" in names else None
            return TextConditions(handle.get_tensor("text_embeds").float(), pooled)

    def _handle(self, chunk_id: int):
        handle = self._handles.get(chunk_id)
        if handle is not None:
            self._handles.move_to_end(chunk_id)
            return handle
        path = self.folder / self.index["chunks"][chunk_id]["file"]
        if not path.exists():
            raise MissingFileError(f"data.cache: chunk {path} listed in {INDEX_NAME} is missing")
        handle = self._handles[chunk_id] = safe_open(str(path), framework="pt")
        if len(self._handles) > MAX_OPEN_CHUNKS:  # large caches have more chunks than file handles allow
            self._handles.popitem(last=False)
        return handle

    def read(self, indices: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The cached tensors of samples ``indices`` (one latent size), stacked, as float32."""
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for index in indices:
            chunk_id, row = self.locations[index]
            handle = self._handle(chunk_id)
            for name in names:
                rows[name].append(handle.get_slice(name)[row : row + 1])
        return {name: torch.cat(values).float() for name, values in rows.items()}

    def index_of(self, key: str) -> int:
        return self.keys.index(key)

    def dataloader(
        self, loader_config: LoaderConfig, *, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0,
        seed: int = 0, resume_samples: int = 0, with_reference: bool = True,
    ) -> CachedLoader:
        return CachedLoader(
            self, loader_config, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
            resume_samples=resume_samples, with_reference=with_reference,
        )


def drop_flags(seed: int, epoch: int, index: int, config: LoaderConfig) -> tuple[bool, bool]:
    """(drop text, drop reference) for cached sample ``index`` in ``epoch``, with the loader's probabilities."""
    draw = random.Random(f"cache-drop/{seed}/{epoch}/{index}").random()
    p_text, p_ref, p_both = config.p_drop_text, config.p_drop_reference, config.p_drop_both
    both = p_text + p_ref <= draw < p_text + p_ref + p_both
    return draw < p_text or both, p_text <= draw < p_text + p_ref or both


class CachedLoader:
    """Batches of one rank over a :class:`LatentCache` for one epoch (what the trainer iterates).

    Order: a permutation of all cached samples seeded by ``(seed, epoch)``, dealt round-robin to the
    ranks, batched within one latent size; every rank gets the same number of full batches.
    """

    def __init__(
        self, cache: LatentCache, loader_config: LoaderConfig, *, batch_size: int, rank: int, world_size: int,
        epoch: int, seed: int, resume_samples: int, with_reference: bool,
    ) -> None:
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"rank {rank} is outside world size {world_size}")
        if resume_samples < 0 or resume_samples % batch_size:
            raise InvalidInputError(
                f"resume_samples={resume_samples} must be a non-negative multiple of batch_size={batch_size}"
            )
        self.cache, self.config, self.batch_size = cache, loader_config, batch_size
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.resume_batches = resume_samples // batch_size
        self.names = LATENT_NAMES + cache.text_part_names
        self.names += (REFERENCE_NAME,) if with_reference and cache.has_reference_features else ()
        if with_reference and cache.index.get("reference_latents"):
            self.names += (REFERENCE_LATENTS_NAME,)
        self.skips = SkipCounter()  # nothing is decoded here: kept for the trainer's logs
        order = list(range(len(cache)))
        random.Random(f"cache-order/{seed}/{epoch}").shuffle(order)
        self.per_rank = [self._batches(order[r::world_size]) for r in range(world_size)]
        self.num_batches = min(len(batches) for batches in self.per_rank)
        if self.num_batches < 1:
            raise InvalidInputError(
                f"data.cache {cache.folder}: {len(cache)} samples give no full batch of {batch_size} on each of "
                f"{world_size} rank(s)"
            )
        if self.resume_batches > self.num_batches:
            raise InvalidInputError(
                f"resume_samples={resume_samples} is past the end of the epoch ({self.num_batches * batch_size} per rank)"
            )
        self._empty = cache.empty_text_embeds()

    def _batches(self, indices: list[int]) -> list[list[int]]:
        shape_of = self.cache.shape_of
        return [batch for _, batch in bucket_batches(indices, lambda i: shape_of[i], self.batch_size, drop_last=True)]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for indices in self.per_rank[self.rank][self.resume_batches : self.num_batches]:
            batch: dict[str, Any] = self.cache.read(indices, self.names)
            flags = [drop_flags(self.seed, self.epoch, index, self.config) for index in indices]
            batch["drop_text"] = torch.tensor([text for text, _ in flags], dtype=torch.bool)
            batch["drop_reference"] = torch.tensor([ref for _, ref in flags], dtype=torch.bool)
            batch["empty_text_embeds"] = self._empty
            batch["key"] = [self.cache.keys[index] for index in indices]
            yield batch


def is_cached_batch(batch: Mapping[str, Any]) -> bool:
    return "latent_mean" in batch


def cached_step_inputs(batch: Mapping[str, Any], stage: int, device) -> StepInputs:
    """A cached batch -> :class:`StepInputs` with the batch's dropout applied (no encoder runs)."""
    drop_text, drop_reference = drop_masks(batch, stage)
    text = TextConditions(batch["text_embeds"], batch.get("pooled_text_embeds")).map(lambda t: t.to(device))
    text = select_text(text, batch["empty_text_embeds"].map(lambda t: t.to(device)), drop_text)
    features = None
    if stage == 2 and REFERENCE_NAME in batch:
        features = condition_reference(batch[REFERENCE_NAME].to(device), drop_reference)
    return StepInputs(
        batch["latent_mean"].to(device),
        batch["latent_std"].to(device),
        batch["masked_mean"].to(device),
        batch["masked_std"].to(device),
        batch["mask"].to(device),
        text.tokens,
        features,
        pooled_text_embeds=text.pooled,
        time_ids=batch["time_ids"].to(device) if "time_ids" in batch else None,
    )


def open_latent_cache(config: TrainConfig, parts, loader_config: LoaderConfig) -> LatentCache:
    """``config.data.cache`` opened and checked against this run's components (raises when stale)."""
    cache = LatentCache(config.data.cache)
    cache.check_compatible(parts, config.run.stage)
    cache.warn_if_loader_differs(loader_config)
    return cache
