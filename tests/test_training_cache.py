"""Latent cache: same loss as the uncached path, cached runs resume exactly, stale caches refused, 2 ranks."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_utils import make_tiny_base, make_toy_shards, subprocess_env, tiny_config, write_config

from dreampainter.cli import main
from dreampainter.data.loading.loader import LoaderConfig, build_dataloader
from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.training import cache as cache_module
from dreampainter.training import load_config, train
from dreampainter.training.cache import LATENT_NAMES, REFERENCE_NAME, LatentCache, cache_latents, drop_flags
from dreampainter.training.components import load_components
from dreampainter.training.inputs import prepare_inputs
from dreampainter.training.step import diffusion_loss, empty_text

DROPS = {"p_drop_text": 0.2, "p_drop_reference": 0.2, "p_drop_both": 0.1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    base, shards = make_tiny_base(root), make_toy_shards(root / "toy")
    config = load_config(write_config(_dict(base, shards, root / "unused"), root / "cache.yaml"))
    cache_latents(config, root / "latents", progress=False)
    return base, shards, root / "latents"


def _dict(base, shards, output_dir, **sections):
    return tiny_config(base, shards, output_dir, data={"loader": DROPS}, **sections)


def _config(tmp_path, setup, name="run", **sections):
    base, shards, cache = setup
    sections.setdefault("data", {})
    sections["data"] = {"cache": str(cache), "loader": DROPS, **sections["data"]}
    return load_config(write_config(tiny_config(base, shards, tmp_path / name, **sections), tmp_path / f"{name}.yaml"))


def test_cached_loss_equals_uncached_loss(tmp_path, setup):
    config = _config(tmp_path, setup)
    parts = load_components(config)
    for module in (parts.vae, parts.text_encoder, parts.reference_encoder):
        module.requires_grad_(False).eval()
    loader_config = config.data.loader
    batch = next(iter(build_dataloader(config.data.train, loader_config, batch_size=6, seed=config.run.seed)))
    batch["drop_text"] = torch.tensor([True, False, False, True, False, False])
    batch["drop_reference"] = torch.tensor([False, True, False, True, False, False])
    uncached = prepare_inputs(batch, parts, empty_text(parts), 2, "cpu")

    cache = LatentCache(setup[2])
    cached_batch = cache.read([cache.index_of(key) for key in batch["key"]], (*LATENT_NAMES, REFERENCE_NAME))
    cached_batch.update(drop_text=batch["drop_text"], drop_reference=batch["drop_reference"],
                        empty_text_embeds=cache.empty_text_embeds())
    cached = prepare_inputs(cached_batch, None, None, 2, "cpu")  # parts=None: no encoder can run
    for name in ("latent_mean", "latent_std", "masked_mean", "masked_std", "mask", "text_embeds", "reference_features"):
        assert torch.allclose(getattr(cached, name), getattr(uncached, name), atol=1e-6), name
    assert cached.reference_features[3].abs().sum() == 0 and cached.reference_features[0].abs().sum() > 0

    losses = [
        diffusion_loss(parts.unet, parts.noise_scheduler, inputs, torch.Generator().manual_seed(7))
        for inputs in (uncached, cached)
    ]
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6), losses
    # a different sample's cache entry gives a different loss (the comparison can fail)
    cached.latent_mean = cached.latent_mean.roll(1, dims=0)
    other = diffusion_loss(parts.unet, parts.noise_scheduler, cached, torch.Generator().manual_seed(7))
    assert not torch.allclose(other, losses[0], atol=1e-6)


def test_cache_index_lists_every_sample_once(setup):
    cache = LatentCache(setup[2])
    index = json.loads((setup[2] / "index.json").read_text())
    assert len(cache) == index["num_samples"] == 36 and len(set(cache.keys)) == 36
    assert index["reference_feature_type"] == "tokens" and set(index["fingerprint"]) == {
        "vae", "text_encoder", "tokenizer", "reference_encoder"}
    rows = cache.read([0, 5], (*LATENT_NAMES, REFERENCE_NAME))
    assert rows["latent_mean"].shape[0] == 2 and rows["mask"].unique().tolist() in ([0.0, 1.0], [1.0])


def test_cached_loader_order_ranks_resume_and_flags(setup):
    cache = LatentCache(setup[2])
    config = LoaderConfig(**DROPS)

    def keys(**kwargs):
        return [key for batch in cache.dataloader(config, batch_size=4, **kwargs) for key in batch["key"]]

    epoch0, epoch1 = keys(epoch=0), keys(epoch=1)
    assert epoch0 == keys(epoch=0) and epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1) == sorted(cache.keys)
    assert keys(epoch=1, resume_samples=12) == epoch1[12:]
    ranks = [keys(epoch=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 12  # 36 samples: 12 per rank = 3 batches of 4
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])
    flags = [drop_flags(0, 0, i, config) for i in range(20000)]
    text_only = sum(t and not r for t, r in flags) / len(flags)
    both = sum(t and r for t, r in flags) / len(flags)
    assert abs(text_only - 0.2) < 0.015 and abs(both - 0.1) < 0.015
    assert flags != [drop_flags(0, 1, i, config) for i in range(20000)]


def _adapter(result):
    return load_file(str(result.pipeline_dir / "reference_adapter" / "adapter.safetensors"))


def test_cached_training_runs_and_resumes_exactly(tmp_path, setup):
    sections = {"train": {"batch_size": 8, "max_steps": 7}, "checkpoint": {"every_steps": 3, "keep_last": 3}}
    full = train(_config(tmp_path, setup, "full", **sections))
    assert full.global_step == 7 and all(torch.isfinite(torch.tensor(full.losses)))

    sections["train"]["max_steps"] = 3  # stop at step 3 (an epoch is 36 // 8 = 4 batches), then go on to 7
    train(_config(tmp_path, setup, "split", **sections))
    sections["train"]["max_steps"] = 7
    sections["checkpoint"]["resume_from_checkpoint"] = "latest"
    resumed = train(_config(tmp_path, setup, "split", **sections))
    assert resumed.losses == full.losses[3:]
    expected, actual = _adapter(full), _adapter(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_stale_or_mismatched_cache_is_refused(tmp_path, setup):
    base, shards, cache = setup
    other = tmp_path / "other_base"
    shutil.copytree(base, other)
    weights_file = other / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_file))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(weights_file))
    with pytest.raises(InvalidInputError, match="is stale: it was made with a different vae"):
        train(_config(tmp_path, setup, model={"pretrained": str(other)}))
    with pytest.raises(InvalidInputError, match="holds 'tokens' reference features.*consumes 'global'"):
        train(_config(tmp_path, setup, model={"adapter": {"projection": "linear", "num_tokens": 4}}))
    with pytest.raises(MissingFileError, match="index.json not found"):
        train(_config(tmp_path, setup, data={"cache": str(tmp_path / "nothing")}))


def test_cache_command_on_two_ranks(tmp_path, setup, capsys, monkeypatch):
    base, shards, single = setup
    config = write_config(_dict(base, shards, tmp_path / "unused"), tmp_path / "c.yaml")
    out = tmp_path / "two_ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               "-m", "dreampainter.cli", "cache-latents", "--config", str(config), "--out", str(out),
               "--chunk-size", "8"]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cached 36 samples" in done.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["parts"] == ["part-00000.json", "part-00001.json"]
    per_rank = [json.loads((out / name).read_text())["num_samples"] for name in index["parts"]]
    assert min(per_rank) > 0 and sum(per_rank) == 36
    two, one = LatentCache(out), LatentCache(single)
    assert sorted(two.keys) == sorted(one.keys) and index["fingerprint"] == one.index["fingerprint"]
    key = one.keys[3]
    a = two.read([two.index_of(key)], LATENT_NAMES)
    b = one.read([one.index_of(key)], LATENT_NAMES)
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in LATENT_NAMES)
    assert len(index["chunks"]) >= 5  # chunks of 8: reads go through the bounded set of open files
    everything = two.read(list(range(len(two))), LATENT_NAMES)
    monkeypatch.setattr(cache_module, "MAX_OPEN_CHUNKS", 2)
    bounded = LatentCache(out)
    assert all(torch.equal(bounded.read(list(range(len(two))), LATENT_NAMES)[n], everything[n]) for n in LATENT_NAMES)
    assert len(bounded._handles) == 2
    assert main(["cache-latents", "--config", str(config), "--out", str(out)]) == 2
    assert "already holds a latent cache" in capsys.readouterr().err
