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
                           (see :func:`dreampainter.data.loading.augment.prepare_reference`)
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

import random
from collections.abc import Iterable, Iterator, Mapping
from itertools import count, islice
from typing import Any, TypeVar

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dreampainter.data.loading.buckets import bucket_batches, nearest_bucket
from dreampainter.data.loading.config import LoaderConfig
from dreampainter.data.loading.sample import (
    DECODE_ERRORS,
    PlannedSample,
    SampleSkipped,
    allocate_batch,
    collate,
    inspect_sample,
    process_sample,
)
from dreampainter.data.loading.skips import SkipCounter, SkipLog
from dreampainter.data.shards.sources import (
    ShardSet,
    check_enough_shards,
    open_shard,
    resolve_shards,
    shard_order,
    split_shards,
)
from dreampainter.data.shards.tar import TarFormatError, TruncatedTarError, iter_tar_samples
from dreampainter.errors import InvalidInputError

__all__ = [
    "DreamEcomDataset",
    "DreamEcomLoader",
    "LoaderConfig",
    "PlannedSample",
    "SkipCounter",
    "build_dataloader",
    "collate",
    "iter_shard_groups",
    "process_sample",
    "shuffle_buffer",
]

SKIPS_ONLY = "skips_only"  # marks the record that carries a worker's trailing skip counts
T = TypeVar("T")


def iter_shard_groups(url: str, log: SkipLog, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream one shard as ``{"__key__", "__url__", suffix: bytes, ...}`` groups (WebDataset's naming).

    The shard validator's reader (:func:`~dreampainter.data.shards.tar.iter_tar_samples`) reads it, so
    both agree on what is complete. Nothing here raises for bad data; it is counted in ``log``:
    ``unreadable_shard`` (cannot be opened), ``truncated_tar`` (ends early, even at a member boundary,
    or a read fails) and ``corrupt_tar`` (corrupt header, a member twice in a sample) keep every
    complete sample before the damage; ``missing_samples`` counts a shortfall against the index.
    """
    produced = 0
    try:
        stream = open_shard(url)
    except Exception as error:  # noqa: BLE001 - any failure to open is a skipped shard, never a crash
        log.skip("unreadable_shard", url, error)
        return
    try:
        with stream:
            for key, members in iter_tar_samples(stream, name=url):
                produced += 1
                yield {"__key__": key, "__url__": url, **members}
    except TruncatedTarError as error:
        log.skip("truncated_tar", url, error)
        return
    except TarFormatError as error:
        log.skip("corrupt_tar", url, error)
        return
    except (OSError, EOFError, ValueError) as error:  # the stream failed (network, pipe exit status)
        log.skip("truncated_tar", url, error)
        return
    if expected is not None and produced < expected:
        log.skip(
            "missing_samples", url, f"{produced} of {expected} samples in the index", expected - produced
        )


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream through a buffer of ``size`` items, drawing only from ``rng``.

    The order is WebDataset's ``shuffle(bufsize=size, initial=size, rng=rng)`` (webdataset 1.0's
    ``_shuffle``), kept here so that seeds and resumed runs give the same order whatever webdataset
    version is installed: while the buffer fills, each step takes two items; once it holds ``size``
    items, each step yields ``buffer[rng.randint(0, len - 1)]`` (the last item takes its place).
    """
    items = iter(items)
    buffer: list[T] = []

    def pick() -> T:
        k = rng.randint(0, len(buffer) - 1)
        item = buffer[k]
        buffer[k] = buffer[-1]
        buffer.pop()
        return item

    for item in items:
        buffer.append(item)
        if len(buffer) < size:
            buffer.extend(islice(items, 1))
        if len(buffer) >= size:
            yield pick()
    while buffer:
        yield pick()


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
        log = SkipLog(worker)
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

    def _planned_batches(self, worker: int, log: SkipLog) -> Iterator[tuple[int, list[PlannedSample]]]:
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
        totals = [sum(1 for _ in self._planned_batches(w, SkipLog(w, quiet=True))) for w in range(workers)]
        consumed, turn, served = [0] * workers, 0, 0
        while served < target and any(c < n for c, n in zip(consumed, totals)):
            if consumed[turn] < totals[turn]:
                consumed[turn] += 1
                served += 1
            turn = (turn + 1) % workers
        return consumed, turn

    def _planned_items(self, worker: int, log: SkipLog) -> Iterator[PlannedSample]:
        """This worker's shards -> tar groups -> seeded shuffle buffer -> cheap checks, pass after pass."""
        if self.config.resampled:
            yield from self._items_of_pass(worker, 0, self._resampled_shards(worker), log)
        else:
            yield from self._items_by_pass(worker, log)

    def _items_by_pass(self, worker: int, log: SkipLog) -> Iterator[PlannedSample]:
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
        self, worker: int, pass_index: int, shards: Iterator[int], log: SkipLog
    ) -> Iterator[PlannedSample]:
        """One pass over ``shards``. Resampled mode is one endless pass in which each shard draw gets
        its own index, so a sample drawn twice is augmented differently (still deterministically)."""
        counts, resampled = self.shards.counts, self.config.resampled
        groups = (
            {**group, "__pass__": draw if resampled else pass_index}
            for draw, shard in enumerate(shards)
            for group in iter_shard_groups(
                self.shards.urls[shard], log, None if counts is None else counts[shard]
            )
        )
        if self.config.shuffle_buffer > 1:
            rng = random.Random(
                f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.num_workers}/{pass_index}"
            )
            groups = shuffle_buffer(groups, self.config.shuffle_buffer, rng)
        for group in groups:
            try:
                item = inspect_sample(group, self.config.max_pixels)
            except SampleSkipped as skip:
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
