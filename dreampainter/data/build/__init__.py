"""``dreampainter data build``: turn a shop's own photos into validated DreamEcom shards.

Stages (each a pluggable component, see :mod:`.components`): scan (decode, size, blur, perceptual
hash, near-duplicates) -> product mask (+ optional refinement and cleanup) -> mask filters ->
background reference -> prompts -> shards. :func:`.pipeline.build_dataset` runs them, resumably,
on one process or on every rank of ``torchrun`` / ``accelerate launch``. See ``docs/data_building.md``.
"""
