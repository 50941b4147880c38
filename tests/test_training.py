"""The trainer: both stages end to end on real shards, outputs, config rules, NaN handling, objective."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf
from safetensors.torch import load_file
from training_utils import REPO, make_tiny_base, make_toy_shards, subprocess_env, tiny_config, write_config

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.models import has_reference_adapter
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.training import TrainingStoppedError, load_config, train
from dreampainter.training.step import StepInputs, diffusion_loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    return make_tiny_base(root), make_toy_shards(root / "toy")


def _config(tmp_path, setup, name="run", **sections):
    base, shards = setup
    path = write_config(tiny_config(base, shards, tmp_path / name, **sections), tmp_path / f"{name}.yaml")
    return load_config(path)


def test_stage1_then_stage2_produce_loadable_pipelines(tmp_path, setup):
    stage1 = train(_config(tmp_path, setup, "s1", run={"stage": 1}, train={"batch_size": 4, "max_steps": 4}))
    assert stage1.global_step == 4 and all(torch.isfinite(torch.tensor(stage1.losses)))
    pipe1 = DreamPainterPipeline.from_pretrained(stage1.pipeline_dir)
    assert not has_reference_adapter(pipe1.unet) and pipe1.reference_encoder is not None
    assert (tmp_path / "s1" / "config.yaml").exists()
    assert OmegaConf.load(tmp_path / "s1" / "config.yaml").run.stage == 1

    stage2 = train(
        _config(tmp_path, setup, "s2", model={"pretrained": str(stage1.pipeline_dir),
                                              "adapter": {"projection": "linear", "num_tokens": 4}})
    )
    out = tmp_path / "s2"
    pipe2 = DreamPainterPipeline.from_pretrained(stage2.pipeline_dir)
    assert has_reference_adapter(pipe2.unet)
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "ip_adapter.safetensors").exists()
    # stage 2 trained only the adapter: the UNet itself is stage 1's, bit for bit
    unet1 = load_file(str(stage1.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    unet2 = load_file(str(stage2.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert unet1.keys() == unet2.keys() and all(torch.equal(unet1[k], unet2[k]) for k in unet1)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and len(summary["rank_checksums"]) == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # keep_last=2


@pytest.mark.parametrize("stage", [2, 1])
def test_bf16_run_saves_the_frozen_weights_unrounded(tmp_path, setup, stage):
    """bf16 casts the frozen VAE, encoders and UNet for speed; the saved pipeline must hold the originals."""
    base, shards = setup
    sections = {"run": {"stage": 2}, "train": {"max_steps": 2, "mixed_precision": "bf16"},
                "checkpoint": {"every_steps": 0}}
    if stage == 1:  # LoRA: the frozen base weights sit under peft's base_layer until fused
        sections.update(run={"stage": 1}, model={"unet_training": "lora"})
    config = write_config(tiny_config(base, shards, tmp_path / "run", **sections), tmp_path / "run.yaml")
    # Its own process: accelerate's state (mixed precision included) is fixed once per process.
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline_dir = tmp_path / "run" / "pipeline"
    for sub, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                      ("reference_encoder", "diffusion_pytorch_model.safetensors"),
                      ("unet", "diffusion_pytorch_model.safetensors")):
        before, after = load_file(str(base / sub / name)), load_file(str(pipeline_dir / sub / name))
        assert all(after[key].dtype == torch.float32 for key in after), sub
        same = [key for key in before if torch.equal(before[key], after[key])]
        if sub != "unet" or stage == 2:  # stage 2 trains the adapter only: the UNet comes back bit for bit
            assert len(same) == len(before), f"{sub}: {len(before) - len(same)} tensors rounded"
        else:  # LoRA fused into the attention projections; everything else is the original
            fused = {key for key in before if key not in same}
            assert fused and all(".attn" in key for key in fused), sorted(fused)[:3]


def test_stage2_learns_on_a_fixed_batch(tmp_path, setup):
    """Loss on fixed noise/timesteps drops after a few adapter steps (a learning signal, not a timing)."""
    base, _ = setup
    result = train(_config(tmp_path, setup, train={"max_steps": 12}, optim={"lr": 3e-3},
                           checkpoint={"every_steps": 0}))
    assert result.global_step == 12
    assert sum(result.losses[-4:]) < sum(result.losses[:4])


def test_lora_stage1_saves_lora_and_a_plain_unet(tmp_path, setup):
    result = train(_config(tmp_path, setup, "lora", run={"stage": 1}, model={"unet_training": "lora", "lora": {"rank": 4}},
                           train={"max_steps": 3}, checkpoint={"every_steps": 0}))
    assert (tmp_path / "lora" / "lora").is_dir()
    weights = load_file(str(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora" in key for key in weights)
    DreamPainterPipeline.from_pretrained(result.pipeline_dir)


def test_nan_losses_stop_the_run_with_a_clear_message(tmp_path, setup):
    config = _config(tmp_path, setup, optim={"lr": 1e30, "max_grad_norm": 0.0},
                     train={"max_steps": 50, "max_consecutive_bad_steps": 3}, checkpoint={"every_steps": 0})
    with pytest.raises(TrainingStoppedError, match="NaN/inf for 3 steps in a row"):
        train(config)


def test_config_rules(tmp_path, setup):
    base, shards = setup
    parent = write_config(tiny_config(base, shards, tmp_path / "x"), tmp_path / "parent.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\noptim:\n  lr: 0.5\ntrain:\n  max_steps: 9\n")
    config = load_config(child, ["train.max_steps=11"])
    assert config.optim.lr == 0.5 and config.train.max_steps == 11 and config.model.pretrained == str(base)
    assert parent.exists()
    with pytest.raises(InvalidInputError, match="unknown config key 'optim.learning_rate'"):
        load_config(child, ["optim.learning_rate=1"])
    child.write_text("base: parent.yaml\ntrainer:\n  steps: 3\n")
    with pytest.raises(InvalidInputError, match="unknown config key 'trainer'"):
        load_config(child)
    with pytest.raises(InvalidInputError, match="override 'data.loader.resolutoin=64': unknown config key 'data.loader.resolutoin'"):
        load_config(parent, ["data.loader.resolutoin=64"])
    with pytest.raises(InvalidInputError, match=r"bad value for 'train.max_steps' \(must be >= 1, got 0\)"):
        load_config(parent, ["train.max_steps=0"])
    with pytest.raises(InvalidInputError, match="must look like key=value"):
        load_config(parent, ["optim.lr"])
    with pytest.raises(MissingFileError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_weights_say_what_to_download(tmp_path, setup):
    config = _config(tmp_path, setup, model={"pretrained": str(tmp_path / "missing")})
    with pytest.raises(MissingFileError, match="model.pretrained folder not found.*stable-diffusion-inpainting"):
        train(config)
    plain = tmp_path / "plain"
    (plain / "vae").mkdir(parents=True)
    config = _config(tmp_path, setup, model={"pretrained": str(plain)})
    with pytest.raises(MissingFileError, match="component 'vae'"):
        train(config)


def _inputs(batch=3):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    return StepInputs(latents, torch.full_like(latents, 0.1), latents * 0.5, torch.full_like(latents, 0.1),
                      (torch.rand(batch, 1, 8, 8, generator=g) > 0.5).float(), torch.randn(batch, 7, 32, generator=g), None)


class _Recorder(torch.nn.Module):
    """Predicts zero and records what the UNet was given."""

    def forward(self, sample, timesteps, encoder_hidden_states, **kwargs):
        self.sample, self.timesteps = sample, timesteps
        return type("Out", (), {"sample": torch.zeros(sample.shape[0], 4, *sample.shape[2:])})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_matches_a_hand_computed_target(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type)
    inputs, unet = _inputs(), _Recorder()
    loss = diffusion_loss(unet, scheduler, inputs, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the same draws in the same order
    latents = inputs.latent_mean + inputs.latent_std * torch.randn(inputs.latent_mean.shape, generator=g)
    masked = inputs.masked_mean + inputs.masked_std * torch.randn(inputs.latent_mean.shape, generator=g)
    noise = torch.randn(inputs.latent_mean.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(loss, target.square().mean(), atol=1e-6)
    assert torch.equal(unet.timesteps, t)
    assert torch.allclose(unet.sample[:, 4:5], inputs.mask) and torch.allclose(unet.sample[:, 5:], masked)
    assert torch.allclose(unet.sample[:, :4], scheduler.add_noise(latents, noise, t))


def test_min_snr_weighting():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    inputs = _inputs(4)
    plain = diffusion_loss(_Recorder(), scheduler, inputs, torch.Generator().manual_seed(1))
    weighted = diffusion_loss(_Recorder(), scheduler, inputs, torch.Generator().manual_seed(1), snr_gamma=5.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn(inputs.latent_mean.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weights = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert not torch.allclose(plain, weighted)
    assert weighted.item() == pytest.approx((weights.mean() * plain).item(), rel=0.3)  # per-sample losses differ a bit


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_trackers_log_offline_with_validation_grids(tmp_path, setup, monkeypatch, tracker):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = _config(tmp_path, setup, logging={"report_to": tracker, "every_steps": 1},
                     train={"max_steps": 2}, checkpoint={"every_steps": 0},
                     validation={"num_samples": 1, "every_steps": 1, "num_inference_steps": 2})
    train(config)
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-0000001.png", "step-0000002.png"]
    if tracker == "wandb":
        assert list((out / "wandb").glob("offline-run-*")), "wandb must run offline, inside the run folder"
    else:
        assert list((out / "logs").rglob("events.out.tfevents.*"))
