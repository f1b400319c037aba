"""ADM-G's noisy classifier (EncoderUNet) against guided-diffusion, and classifier guidance in ddpm.

Fixtures (recorded from a transcription of guided-diffusion's ``EncoderUNetModel``,
``ResBlock``, ``AttentionBlock``/``QKVAttentionLegacy``, ``AttentionPool2d``/``QKVAttention`` and
``create_classifier``, openai/guided-diffusion ``unet.py`` / ``script_util.py``):

- ``adm_classifier128_keys.txt``: state-dict names and shapes of the 128x128 ImageNet classifier.
- ``adm_classifier_tiny*.safetensors``: a tiny random classifier (every parameter randomised,
  including the zero-initialised ones), its logits and the guidance gradient
  ``grad_x log softmax(logits)[y]`` for three inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from epsscale import Linear, StackedGenerator, VPDenoiser, VPSchedule, eps_scaling, prior
from epsscale.adapters import as_prediction
from epsscale.models.adm import load_adm_state_dict
from epsscale.models.adm_classifier import (
    AttentionPool2d,
    EncoderUNet,
    classifier_guidance,
    create_adm_classifier,
)
from epsscale.samplers import ddpm, ddpm_posterior

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"

IMAGENET128_CLASSIFIER_FLAGS = {
    "image_size": 128, "classifier_width": 128, "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8", "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True, "classifier_pool": "attention",
}  # fmt: skip

# The configuration of the recorded tiny classifier (guided-diffusion takes attention *rates*:
# (2,) at image_size 16 is resolution 8).
TINY = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
            attention_resolutions=(8,), channel_mult=(1, 2), num_head_channels=32,
            use_scale_shift_norm=True, resblock_updown=True, pool="attention")  # fmt: skip


def _reference_keys() -> tuple[list[tuple[str, list[int]]], int]:
    lines = (FIXTURES / "adm_classifier128_keys.txt").read_text().splitlines()
    num_params = next(int(l.split()[-1]) for l in lines if l.startswith("# num_params"))
    keys = []
    for line in lines:
        if line and not line.startswith("#"):
            name, shape = line.split()
            keys.append((name, [int(s) for s in shape.split(",")]))
    return keys, num_params


def _tiny() -> tuple[EncoderUNet, dict[str, torch.Tensor]]:
    model = EncoderUNet(**TINY)
    load_adm_state_dict(model, load_file(FIXTURES / "adm_classifier_tiny.safetensors"))
    return model.eval(), load_file(FIXTURES / "adm_classifier_tiny_forward.safetensors")


# ---------------------------------------------------------------------------------------------
# Architecture and numerics against guided-diffusion.
# ---------------------------------------------------------------------------------------------


def test_imagenet128_classifier_keys_and_shapes() -> None:
    reference, num_params = _reference_keys()
    with torch.device("meta"):
        model = create_adm_classifier(IMAGENET128_CLASSIFIER_FLAGS)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert [k for k, _ in ours] == [k for k, _ in reference]  # same names, same order
    assert ours == reference
    assert sum(p.numel() for p in model.parameters()) == num_params
    # The pooling head: 8x8 tokens plus the mean token, 512 channels in 8 heads of 64.
    pool = model.out[2]
    assert isinstance(pool, AttentionPool2d) and pool.num_heads == 8 and pool.spatial_dim == 8


def test_tiny_forward_matches_reference() -> None:
    model, ref = _tiny()
    with torch.no_grad():
        logits = model(ref["x"], ref["t"])
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    x_cl = ref["x"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x_cl, ref["t"]), ref["logits"], rtol=1e-5, atol=1e-5)


def test_guidance_gradient_matches_reference() -> None:
    """cond_fn of classifier_sample.py: scale * grad_x log softmax(classifier(x, t))[y]."""
    model, ref = _tiny()
    schedule = VPSchedule("linear")
    sigma = schedule.sigma(ref["t"])  # sigma whose original timestep is exactly t
    grad = classifier_guidance(model, schedule, 1.0)(ref["x"], sigma, y=ref["y"])
    assert grad.shape == ref["x"].shape and grad.dtype == ref["x"].dtype
    torch.testing.assert_close(grad, ref["grad"], rtol=1e-4, atol=1e-6)
    half = classifier_guidance(model, schedule, 0.5)(ref["x"], sigma, y=ref["y"], unused="ignored")
    torch.testing.assert_close(half, 0.5 * ref["grad"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool", ["adaptive", "spatial", "spatial_v2"])
def test_other_pools_build_and_run(pool: str) -> None:
    torch.manual_seed(0)
    model = EncoderUNet(**{**TINY, "pool": pool}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 900]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    keys = list(model.state_dict())
    expected_head = {
        "adaptive": ["out.0.weight", "out.0.bias", "out.3.weight", "out.3.bias"],
        "spatial": ["out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"],
        "spatial_v2": ["out.0.weight", "out.0.bias", "out.1.weight", "out.1.bias", "out.3.weight", "out.3.bias"],
    }[pool]
    assert [k for k in keys if k.startswith("out.")] == expected_head
    if pool.startswith("spatial"):
        # The MLP reads the spatial means of every input block and the middle block: 32 (conv) +
        # 32 (level 0) + 32 (down) + 64 (level 1) + 64 (middle) = 224 features.
        assert model.out[0].weight.shape == (2048, 224)


# ---------------------------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------------------------


def test_flags_as_strings_and_full_script_flag_set() -> None:
    as_strings = {k: str(v) for k, v in IMAGENET128_CLASSIFIER_FLAGS.items()}
    # classifier_sample.py's whole flag set: model, diffusion and sampling flags are ignored.
    as_strings |= {"num_channels": "256", "num_heads": "4", "class_cond": "True", "learn_sigma": "True",
                   "noise_schedule": "linear", "classifier_scale": "0.5", "classifier_use_fp16": "True",
                   "timestep_respacing": "100", "use_fp16": "True"}  # fmt: skip
    with torch.device("meta"):
        a = create_adm_classifier(IMAGENET128_CLASSIFIER_FLAGS)
        b = create_adm_classifier(as_strings)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"classifier_widht": 128}, "classifier_widht"),
        ({"classifier_pool": "max"}, "classifier_pool"),
        ({"classifier_depth": "two"}, "classifier_depth"),
        ({"image_size": 48}, "image_size"),
        ({"classifier_resblock_updown": "perhaps"}, "classifier_resblock_updown"),
    ],
)
def test_bad_flags_name_the_flag(flags: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"'{named}'"):
        create_adm_classifier(flags)


def test_config_round_trip() -> None:
    with torch.device("meta"):
        model = create_adm_classifier(IMAGENET128_CLASSIFIER_FLAGS)
        again = EncoderUNet(**model.config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_attention_pool_needs_head_channels() -> None:
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNet(**{**TINY, "num_head_channels": -1})


# ---------------------------------------------------------------------------------------------
# The guidance hook.
# ---------------------------------------------------------------------------------------------


class _Spy(nn.Module):
    """Records the timesteps a classifier is called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        return self.inner(x, t)


def test_hook_gives_finite_gradients_at_original_timesteps() -> None:
    torch.manual_seed(0)
    schedule = VPSchedule("linear")
    spy = _Spy(EncoderUNet(**TINY).eval())
    guide = classifier_guidance(spy, schedule, 0.5)
    kept = schedule.respace("20")[::-1]  # original timesteps of a respaced chain, noisiest first
    grid = schedule.grid("20")
    x = torch.randn(2, 3, 16, 16)
    for i in (0, 7, 19):
        grad = guide(x, grid[i].expand(2), y=torch.tensor([1, 9]))
        assert grad.shape == x.shape and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
        assert spy.calls[-1].tolist() == [kept[i], kept[i]]
        assert spy.calls[-1].dtype == torch.long
    # Per-sample sigmas map to per-sample timesteps.
    guide(x, torch.stack([grid[0], grid[19]]), y=torch.tensor([1, 9]))
    assert spy.calls[-1].tolist() == [kept[0], kept[19]]
    # The classifier's parameters get no gradient: only x is differentiated.
    assert all(p.grad is None for p in spy.parameters())


def test_hook_validates_its_arguments() -> None:
    schedule = VPSchedule("linear")
    model = EncoderUNet(**TINY)
    with pytest.raises(ValueError, match="scale"):
        classifier_guidance(model, schedule, float("nan"))
    with pytest.raises(ValueError, match="VPSchedule"):
        classifier_guidance(model, "linear", 1.0)  # type: ignore[arg-type]
    guide = classifier_guidance(model, schedule, 1.0)
    x, sigma = torch.randn(2, 3, 16, 16), schedule.sigma(torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="labels"):
        guide(x, sigma)
    with pytest.raises(ValueError, match="one label per sample"):
        guide(x, sigma, y=torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------------------------------
# Classifier guidance inside ddpm: ES scales the model's eps, never the gradient.
# ---------------------------------------------------------------------------------------------


class _LearnedSigmaNet(nn.Module):
    """A fixed class-conditional eps net with learned-range variance output (6 channels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.eps = nn.Conv2d(3, 3, 3, padding=1)
        self.var = nn.Conv2d(3, 3, 1)
        self.label = nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        shift = self.label(y)[:, :, None, None] + (t.float() / 1000)[:, None, None, None]
        return torch.cat([torch.tanh(self.eps(x)) + 0.1 * shift, torch.tanh(self.var(x))], dim=1)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_guidance_shift_is_independent_of_es(clip: float | None) -> None:
    schedule = VPSchedule("linear")
    den = VPDenoiser(_LearnedSigmaNet().eval(), schedule, learn_sigma=True)
    es = eps_scaling(den, 1.05)
    torch.manual_seed(1)
    # A large scale makes the shift (~2e-2) far larger than float32 rounding of the mean (~1e-6).
    guide = classifier_guidance(EncoderUNet(**TINY).eval(), schedule, 20.0)
    grid = schedule.grid("20")
    step = grid[5:7]  # one ancestral step between two kept timesteps (noise is injected)
    y = torch.tensor([4, 0, 7])
    seeds = [11, 12, 13]
    x = prior(StackedGenerator(seeds).randn((3, 3, 16, 16)), step[0], kind="vp")

    def run(denoiser, grad) -> torch.Tensor:
        out = ddpm(denoiser, x, step, noise=StackedGenerator(seeds), cond={"y": y}, clip=clip, classifier_grad=grad)
        return out / (1 + step[1] ** 2).sqrt()  # back to VP units

    with torch.no_grad():
        shift_es = run(es, guide) - run(es, None)
        shift_plain = run(den, guide) - run(den, None)
        es_effect = run(es, None) - run(den, None)

    # The expected shift: learned variance (untouched by ES) times the classifier gradient at x_t.
    x_vp = (x * (1 / (1 + step[0] ** 2)).sqrt()).float()
    with torch.no_grad():
        pred = as_prediction(den(x, step[0].expand(3), y=y))
    variance = ddpm_posterior(pred, x_vp, step, 0).variance
    expected = (variance * guide(x_vp, step[0].expand(3), y=y)).double()

    assert expected.abs().max() > 1e-2  # guidance does something
    assert es_effect.abs().max() > 1e-2  # and so does ES
    # Measured: max |difference| ~1e-6 (float32 rounding of means of size ~1).
    torch.testing.assert_close(shift_es, expected, rtol=0, atol=5e-6)
    torch.testing.assert_close(shift_plain, expected, rtol=0, atol=5e-6)
    torch.testing.assert_close(shift_es, shift_plain, rtol=0, atol=5e-6)


def test_ddpm_guided_sampling_runs_with_linear_es() -> None:
    schedule = VPSchedule("linear")
    grid = schedule.grid("10")
    den = eps_scaling(VPDenoiser(_LearnedSigmaNet().eval(), schedule, learn_sigma=True), Linear(0.00022, 1.00291), sigmas=grid)
    torch.manual_seed(2)
    guide = classifier_guidance(EncoderUNet(**TINY).eval(), schedule, 0.5)
    seeds = [0, 1]
    x = prior(StackedGenerator(seeds).randn((2, 3, 16, 16)), grid[0], kind="vp")
    with torch.no_grad():
        out = ddpm(den, x, grid, noise=StackedGenerator(seeds), cond={"y": torch.tensor([3, 5])}, clip=1.0, classifier_grad=guide)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
