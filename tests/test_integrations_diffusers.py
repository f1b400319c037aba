"""Epsilon Scaling on diffusers pipelines (epsscale.integrations.diffusers).

Every pipeline is built from a tiny random config, written with ``save_pretrained`` and read
back with ``from_pretrained`` from the local folder. The reference for "ES on" is always written
out by hand here, with the textbook conversions (eps, x0, v, flow velocity) rather than the
module's compact formula.

transformers is not installed, so no stock text-to-image pipeline can be built. The latent cases
are the stock ``LDMPipeline`` (VQModel + UNet2DModel) and ``TinyLatentCFGPipeline`` below: Stable
Diffusion's denoising loop (CFG, guidance_rescale) on given prompt embeddings, with a tiny
AutoencoderKL + UNet2DConditionModel. No stock flow-matching pipeline can be built without
transformers either, so the flow cases run ``DDPMPipeline``'s loop with a
``FlowMatchEulerDiscreteScheduler`` (its loop is exactly the flow Euler loop) and an SD3-style
CFG loop written here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LDMPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from epsscale.integrations.diffusers import (  # noqa: E402
    EpsilonScalingHandle,
    apply_epsilon_scaling,
    remove_epsilon_scaling,
)
from epsscale.scaling import TSR, Calibrated, Linear, PerSigma, Uniform  # noqa: E402

torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()

TOL = dict(rtol=1e-5, atol=1e-5)

# diffusers' schedulers trip numpy 2 deprecations on torch tensors; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


# ---------------------------------------------------------------------------------------------
# Tiny models, round-tripped through save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------------


def _unet(**kw) -> UNet2DModel:
    torch.manual_seed(0)
    cfg = dict(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return UNet2DModel(**{**cfg, **kw}).eval()


def _roundtrip(pipe: DiffusionPipeline, folder: Path) -> DiffusionPipeline:
    pipe.save_pretrained(folder)
    loaded = type(pipe).from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return loaded


class TinyLatentCFGPipeline(DiffusionPipeline):
    """Stable Diffusion's denoising loop on given prompt embeddings (no text encoder).

    ``hand_es(pred, x_t, t, i)`` is the reference: ES written by hand on the guided prediction
    (and on the text branch that guidance_rescale takes its std from), after CFG and before
    guidance_rescale.
    """

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds, *, guidance_scale=3.0, guidance_rescale=0.7,
                 num_inference_steps=3, generator=None, hand_es=None):
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        n = prompt_embeds.shape[0]
        size = self.unet.config.sample_size
        latents = randn_tensor((n, self.unet.config.in_channels, size, size), generator=generator, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        for i, t in enumerate(self.scheduler.timesteps):
            # Network on both CFG branches at once.
            model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = self.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            # Classifier-free guidance, then guidance rescale (Lin et al. 2023), as SD does.
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
            if hand_es is not None:
                noise_pred = hand_es(noise_pred, model_in[:n], t, i)
                text = hand_es(text, model_in[:n], t, i)
            noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


@pytest.fixture(scope="module")
def ddpm_pipe(tmp_path_factory):
    pipe = DDPMPipeline(unet=_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    return _roundtrip(pipe, tmp_path_factory.mktemp("ddpm"))


@pytest.fixture(scope="module")
def ddim_pipe(tmp_path_factory):
    pipe = DDIMPipeline(unet=_unet(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    return _roundtrip(pipe, tmp_path_factory.mktemp("ddim"))


@pytest.fixture(scope="module")
def dit_pipe(tmp_path_factory):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=4, patch_size=2, norm_num_groups=16,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    return _roundtrip(pipe, tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="module")
def ldm_pipe(tmp_path_factory):
    torch.manual_seed(0)
    vqvae = VQModel(block_out_channels=(32,), latent_channels=3, sample_size=8, num_vq_embeddings=16).eval()
    pipe = LDMPipeline(vqvae=vqvae, unet=_unet(), scheduler=EulerDiscreteScheduler(prediction_type="v_prediction"))
    return _roundtrip(pipe, tmp_path_factory.mktemp("ldm"))


@pytest.fixture(scope="module")
def latent_cfg_pipe(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8,
    ).eval()
    scheduler = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    return _roundtrip(TinyLatentCFGPipeline(vae=vae, unet=unet, scheduler=scheduler), tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def flow_pipe(tmp_path_factory):
    pipe = DDPMPipeline(unet=_unet(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _roundtrip(pipe, tmp_path_factory.mktemp("flow"))


@pytest.fixture(scope="module")
def flow_cfg_pipe(tmp_path_factory):
    pipe = DDPMPipeline(unet=_unet(num_class_embeds=4), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _roundtrip(pipe, tmp_path_factory.mktemp("flow_cfg"))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(pipe, **kw) -> torch.Tensor:
    out = pipe(generator=gen(), **kw).images
    return torch.as_tensor(out)


class InputRecorder:
    """Records the x_t every denoiser call sees (the trajectory, unclamped)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.xs: list[torch.Tensor] = []
        self._h = module.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.xs.append(x.detach().clone())

    def remove(self) -> list[torch.Tensor]:
        self._h.remove()
        return self.xs


def patch_forward(module: torch.nn.Module, fn):
    """Replace module.forward by ``fn(orig_forward, *args, **kwargs)`` until the returned undo()."""
    orig = module.forward
    module.forward = lambda *a, **k: fn(orig, *a, **k)
    return lambda: module.__dict__.pop("forward", None)


def divide_output_by(lam: float):
    """A forward patch that divides the whole network output by lam ("scale eps by hand")."""

    def fn(orig, *a, **k):
        r = orig(*a, **k)
        return type(r)(sample=r.sample / lam)

    return fn


def count_calls(module: torch.nn.Module):
    calls = [0]

    def fn(orig, *a, **k):
        calls[0] += 1
        return orig(*a, **k)

    return calls, patch_forward(module, fn)


def es_vp(out, x_t, abar, lam, prediction):
    """Textbook ES on one VP output: eps -> eps / lam at fixed x_t, re-expressed as `prediction`."""
    o, x = out.double(), x_t.double()
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    if prediction == "epsilon":
        eps = o
    elif prediction == "v_prediction":
        eps = a * o + s * x  # v = a eps - s x0
    else:
        eps = (x - a * o) / s  # o = x0
    eps2 = eps / lam
    x0_2 = (x - s * eps2) / a
    new = {"epsilon": eps2, "v_prediction": a * eps2 - s * x0_2, "sample": x0_2}[prediction]
    return new.to(out.dtype)


def es_flow(u, x_t, t, lam):
    """Textbook ES on a flow velocity u = eps - x0 with x_t = (1 - t) x0 + t eps (t = 1: unscaled)."""
    if t >= 1:
        return u
    uu, x = u.double(), x_t.double()
    eps = x + (1 - t) * uu
    eps2 = eps / lam
    x0_2 = (x - t * eps2) / (1 - t)
    return (eps2 - x0_2).to(u.dtype)


def assert_same_trajectory(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


# ---------------------------------------------------------------------------------------------
# DDPM (ancestral, clipped x0): all three VP prediction types
# ---------------------------------------------------------------------------------------------


def test_ddpm_lambda_one_is_bit_identical_and_remove_restores(ddpm_pipe):
    base = images(ddpm_pipe, num_inference_steps=3, output_type="pt")
    with apply_epsilon_scaling(ddpm_pipe, 1.0) as handle:
        assert torch.equal(images(ddpm_pipe, num_inference_steps=3, output_type="pt"), base)
    assert not handle.active

    handle = apply_epsilon_scaling(ddpm_pipe, Uniform(1.2))
    scaled = images(ddpm_pipe, num_inference_steps=3, output_type="pt")
    assert (scaled - base).abs().max() > 1e-3
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(images(ddpm_pipe, num_inference_steps=3, output_type="pt"), base)


def test_ddpm_eps_equals_hand_scaled_model(ddpm_pipe):
    lam = 1.15
    undo = patch_forward(ddpm_pipe.unet, divide_output_by(lam))
    want = images(ddpm_pipe, num_inference_steps=4, output_type="pt")
    undo()
    with apply_epsilon_scaling(ddpm_pipe, lam):
        got = images(ddpm_pipe, num_inference_steps=4, output_type="pt")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_matches_hand_written_loop(ddpm_pipe, prediction):
    lam, steps = 1.1, 3
    original = ddpm_pipe.scheduler
    ddpm_pipe.scheduler = DDPMScheduler.from_config(original.config, prediction_type=prediction)
    try:
        # Hand-written DDPMPipeline loop with ES on the network output.
        sched, unet = ddpm_pipe.scheduler, ddpm_pipe.unet
        g = gen()
        x = randn_tensor((1, 3, 8, 8), generator=g, dtype=torch.float32)
        sched.set_timesteps(steps)
        want = []
        with torch.no_grad():
            for t in sched.timesteps:
                want.append(x.clone())
                out = es_vp(unet(x, t).sample, x, float(sched.alphas_cumprod[t]), lam, prediction)
                x = sched.step(out, t, x, generator=g).prev_sample
        want_img = (x / 2 + 0.5).clamp(0, 1)

        rec = InputRecorder(unet)
        with apply_epsilon_scaling(ddpm_pipe, lam):
            got_img = images(ddpm_pipe, num_inference_steps=steps, output_type="pt")
        assert_same_trajectory(rec.remove(), want)
        torch.testing.assert_close(got_img, want_img, **TOL)
    finally:
        ddpm_pipe.scheduler = original


# ---------------------------------------------------------------------------------------------
# Validation, idempotence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -1, float("nan"), float("inf"), -float("inf")])
def test_bad_lambda_raises_before_the_network(ddpm_pipe, bad):
    calls, undo = count_calls(ddpm_pipe.unet)
    try:
        with pytest.raises(ValueError, match="finite and > 0"):
            apply_epsilon_scaling(ddpm_pipe, bad)
        with pytest.raises(ValueError):
            apply_epsilon_scaling(ddpm_pipe, PerSigma((1.0, 2.0), (1.0, bad)))
        with pytest.raises(ValueError):
            apply_epsilon_scaling(ddpm_pipe, Linear(k=bad, b=1.0) if not math.isfinite(bad) else Linear(k=0.0, b=bad))
        assert calls[0] == 0
        ddpm_pipe(num_inference_steps=2, output_type="pt")  # nothing was installed
        assert calls[0] == 2
    finally:
        undo()


@pytest.mark.parametrize("bad", [True, "1.01", None, [1.01]])
def test_lambda_that_is_not_a_number_or_schedule_raises(ddpm_pipe, bad):
    with pytest.raises(ValueError):
        apply_epsilon_scaling(ddpm_pipe, bad)


def test_linear_schedule_that_goes_nonpositive_raises_before_the_network(ddim_pipe):
    # The pipeline is shared by the module, and apply binds to the grid its scheduler holds: start
    # from a 2-step grid, whatever step count the test before this one left behind (4 made the
    # apply below raise, when tests ran in reverse).
    ddim_pipe.scheduler.set_timesteps(2)
    calls, undo = count_calls(ddim_pipe.unet)
    try:
        with pytest.raises(ValueError):
            apply_epsilon_scaling(ddim_pipe, Linear(k=0.1, b=0.0))  # lambda_0 = b = 0 on any grid
        handle = apply_epsilon_scaling(ddim_pipe, Linear(k=-0.5, b=1.0))  # fine for 2 steps, not for 4
        with pytest.raises(ValueError, match="finite and > 0"):
            ddim_pipe(num_inference_steps=4, output_type="pt")
        assert calls[0] == 0
        ddim_pipe(num_inference_steps=2, output_type="pt")
        assert calls[0] == 2
        handle.remove()
    finally:
        undo()


def test_bad_flow_mode_and_unsupported_scheduler(ddpm_pipe):
    with pytest.raises(ValueError, match="flow_mode"):
        apply_epsilon_scaling(ddpm_pipe, 1.01, flow_mode="x0")
    edm = DDPMPipeline(unet=ddpm_pipe.unet, scheduler=diffusers.EDMEulerScheduler())
    with pytest.raises(ValueError, match="not supported"):
        apply_epsilon_scaling(edm, 1.01)
    with pytest.raises(ValueError, match="no denoiser"):
        apply_epsilon_scaling(ddpm_pipe, 1.01, component="transformer")


def test_apply_twice_replaces_instead_of_stacking(ddpm_pipe):
    with apply_epsilon_scaling(ddpm_pipe, 1.3):
        once = images(ddpm_pipe, num_inference_steps=2, output_type="pt")
    first = apply_epsilon_scaling(ddpm_pipe, 1.3)
    second = apply_epsilon_scaling(ddpm_pipe, 1.3)
    assert not first.active and second.active
    assert len(ddpm_pipe.unet._forward_hooks) == 1 and len(ddpm_pipe.unet._forward_pre_hooks) == 1
    torch.testing.assert_close(images(ddpm_pipe, num_inference_steps=2, output_type="pt"), once, rtol=0, atol=0)
    assert remove_epsilon_scaling(ddpm_pipe) is True
    assert remove_epsilon_scaling(ddpm_pipe) is False
    assert not ddpm_pipe.unet._forward_hooks and not ddpm_pipe.unet._forward_pre_hooks
    assert isinstance(second, EpsilonScalingHandle) and not second.active


# ---------------------------------------------------------------------------------------------
# DDIM: step-indexed Linear schedule, per-sigma schedule, scheduler swapped after apply
# ---------------------------------------------------------------------------------------------


def test_ddim_linear_schedule_rebinds_for_each_grid(ddim_pipe):
    b, k = 1.02, 0.05
    want = {}
    for steps in (4, 3):
        count = [0]

        def by_hand(orig, *a, **kw):  # lambda_i = b + k i with i = steps - 1, ..., 0
            lam = b + k * (steps - 1 - count[0])
            count[0] += 1
            r = orig(*a, **kw)
            return type(r)(sample=r.sample / lam)

        undo = patch_forward(ddim_pipe.unet, by_hand)
        want[steps] = images(ddim_pipe, num_inference_steps=steps, output_type="pt")
        undo()

    with apply_epsilon_scaling(ddim_pipe, Calibrated(Linear(k=k, b=b), {"source": "test"})) as handle:
        for steps in (4, 3, 4):  # one handle, rebound at each set_timesteps
            got = images(ddim_pipe, num_inference_steps=steps, output_type="pt")
            torch.testing.assert_close(got, want[steps], **TOL)
            assert float(handle.last_lam[0]) == pytest.approx(b)  # the last step has i = 0


def test_ddim_persigma_after_scheduler_swap_matches_hand_loop(ddim_pipe):
    table = PerSigma((0.1, 1.0, 10.0), (1.05, 1.2, 1.1))
    original = ddim_pipe.scheduler
    v_sched = DDIMScheduler.from_config(original.config, prediction_type="v_prediction")
    unet = ddim_pipe.unet

    # Hand-written DDIMPipeline loop, lambda looked up at sigma = sqrt((1 - abar_t) / abar_t).
    g = gen()
    x = randn_tensor((1, 3, 8, 8), generator=g, dtype=torch.float32)
    v_sched.set_timesteps(4)
    want = []
    with torch.no_grad():
        for t in v_sched.timesteps:
            want.append(x.clone())
            abar = float(v_sched.alphas_cumprod[t])
            lam = float(table.lam(torch.tensor(math.sqrt((1 - abar) / abar), dtype=torch.float64)))
            out = es_vp(unet(x, t).sample, x, abar, lam, "v_prediction")
            x = v_sched.step(out, t, x, eta=0.0, generator=g).prev_sample

    handle = apply_epsilon_scaling(ddim_pipe, table)  # applied with the epsilon scheduler ...
    ddim_pipe.scheduler = v_sched  # ... which is then swapped: the hook reads pipe.scheduler per call
    try:
        rec = InputRecorder(unet)
        images(ddim_pipe, num_inference_steps=4, output_type="pt")
        assert_same_trajectory(rec.remove(), want)
    finally:
        handle.remove()
        ddim_pipe.scheduler = original


def test_ddim_tsr_matches_hand_loop_that_multiplies_eps_by_r(ddim_pipe):
    """TSR (an ES schedule, lambda = 1/r) on a DDIM pipeline = the official TSR_DDIMScheduler:
    eps *= r with r = (abar s^2 + 1 - abar) / (abar s^2 / k + 1 - abar) at the step's timestep."""
    k, s, steps = 0.8, 1.0, 4
    sched, unet = ddim_pipe.scheduler, ddim_pipe.unet
    g = gen()
    x = randn_tensor((1, 3, 8, 8), generator=g, dtype=torch.float32)
    sched.set_timesteps(steps)
    want = []
    with torch.no_grad():
        for t in sched.timesteps:
            want.append(x.clone())
            abar = float(sched.alphas_cumprod[t])
            r = (abar * s**2 + 1 - abar) / (abar * s**2 / k + 1 - abar)
            x = sched.step(unet(x, t).sample * r, t, x, eta=0.0, generator=g).prev_sample
    want_img = (x / 2 + 0.5).clamp(0, 1)

    base = images(ddim_pipe, num_inference_steps=steps, output_type="pt")
    rec = InputRecorder(unet)
    with apply_epsilon_scaling(ddim_pipe, TSR(k, s)) as handle:
        got_img = images(ddim_pipe, num_inference_steps=steps, output_type="pt")
        assert float(handle.last_lam[0]) == pytest.approx(1 / k, rel=1e-3)  # the last step is nearly clean: r -> k
    assert_same_trajectory(rec.remove(), want)
    # float32 network and scheduler on both sides; the two loops round r in different orders.
    torch.testing.assert_close(got_img, want_img, **TOL)
    assert (got_img - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# DiT: CFG (batch doubling) + learned sigma, DPM-Solver++ (a sigma-table scheduler)
# ---------------------------------------------------------------------------------------------


def test_dit_cfg_learned_sigma(dit_pipe):
    kw = dict(class_labels=[1, 7], guidance_scale=4.0, num_inference_steps=3, output_type="pt")
    table = PerSigma((0.5, 5.0), (1.05, 1.25))
    base = images(dit_pipe, **kw)
    with apply_epsilon_scaling(dit_pipe, 1.0):
        assert torch.equal(images(dit_pipe, **kw), base)

    # Reference: ES by hand on the guided eps that the scheduler receives (after CFG).
    sched = dit_pipe.scheduler
    orig_step = sched.step

    def es_step(model_output, t, sample, **k):
        abar = float(sched.alphas_cumprod[t])
        lam = float(table.lam(torch.tensor(math.sqrt((1 - abar) / abar), dtype=torch.float64)))
        return orig_step(model_output / lam, t, sample, **k)

    sched.step = es_step
    want = images(dit_pipe, **kw)
    del sched.step

    raw, seen = [], []
    h_raw = dit_pipe.transformer.register_forward_hook(lambda m, a, o: raw.append(o.sample.clone()))
    handle = apply_epsilon_scaling(dit_pipe, table)
    h_seen = dit_pipe.transformer.register_forward_hook(lambda m, a, o: seen.append(o.sample.clone()))
    got = images(dit_pipe, **kw)
    h_raw.remove()
    h_seen.remove()
    torch.testing.assert_close(got, want, **TOL)
    assert (got - base).abs().max() > 1e-4

    # Learned-sigma channels (the second C of 2C) are untouched; the eps channels are scaled.
    c = dit_pipe.transformer.config.in_channels
    for r, s in zip(raw, seen):
        assert s.shape == r.shape == (4, 2 * c, 4, 4)
        assert torch.equal(s[:, c:], r[:, c:])
        assert not torch.equal(s[:, :c], r[:, :c])

    handle.remove()
    assert torch.equal(images(dit_pipe, **kw), base)


def test_dit_bad_lambda_never_calls_the_transformer(dit_pipe):
    calls, undo = count_calls(dit_pipe.transformer)
    try:
        for bad in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError):
                apply_epsilon_scaling(dit_pipe, bad)
        assert calls[0] == 0
    finally:
        undo()


# ---------------------------------------------------------------------------------------------
# Latent pipelines: LDMPipeline (Euler, v-prediction) and SD's loop with CFG + guidance_rescale
# ---------------------------------------------------------------------------------------------


def test_ldm_euler_v_prediction(ldm_pipe):
    lam, steps = 1.1, 3
    kw = dict(batch_size=1, num_inference_steps=steps, output_type="np")
    base = images(ldm_pipe, **kw)
    with apply_epsilon_scaling(ldm_pipe, 1.0):
        assert torch.equal(images(ldm_pipe, **kw), base)

    # Hand-written LDMPipeline loop; Euler's model input is the VP x_t at sigmas[i].
    sched, unet, vq = ldm_pipe.scheduler, ldm_pipe.unet, ldm_pipe.vqvae
    latents = randn_tensor((1, 3, 8, 8), generator=gen()) * sched.init_noise_sigma
    sched.set_timesteps(steps)
    want = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_t = sched.scale_model_input(latents, t)
            want.append(x_t.clone())
            sigma = float(sched.sigmas[i])
            out = es_vp(unet(x_t, t).sample, x_t, 1 / (1 + sigma**2), lam, "v_prediction")
            latents = sched.step(out, t, latents).prev_sample
        want_img = (vq.decode(latents / vq.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    rec = InputRecorder(unet)
    with apply_epsilon_scaling(ldm_pipe, lam):
        got = images(ldm_pipe, **kw)
    assert_same_trajectory(rec.remove(), want)
    torch.testing.assert_close(got, want_img, **TOL)
    assert torch.equal(images(ldm_pipe, **kw), base)


def test_latent_cfg_guidance_rescale_v_prediction(latent_cfg_pipe):
    pipe, lam = latent_cfg_pipe, 1.1
    emb = torch.randn(2, 5, 16, generator=gen(1))
    neg = torch.zeros_like(emb)

    def run(**k):
        return pipe(emb, neg, guidance_scale=3.0, guidance_rescale=0.7, generator=gen(), **k)

    base = run()
    with apply_epsilon_scaling(pipe, 1.0):
        assert torch.equal(run(), base)

    sched = pipe.scheduler

    def hand_es(pred, x_t, t, i):
        return es_vp(pred, x_t, float(sched.alphas_cumprod[t]), lam, "v_prediction")

    want = run(hand_es=hand_es)
    with apply_epsilon_scaling(pipe, lam):
        got = run()
    torch.testing.assert_close(got, want, **TOL)
    assert (got - base).abs().max() > 1e-4

    # ES at scheduler.step (after guidance_rescale) is a different sampler: the hook is not there.
    orig_step = sched.step
    sched.step = lambda out, t, x, **k: orig_step(es_vp(out, x, float(sched.alphas_cumprod[t]), lam, "v_prediction"), t, x, **k)
    after_rescale = run()
    del sched.step
    assert (after_rescale - want).abs().max() > 1e-4
    assert torch.equal(run(), base)


# ---------------------------------------------------------------------------------------------
# Flow matching (FlowMatchEulerDiscreteScheduler, shift 3: the first step is at t = 1)
# ---------------------------------------------------------------------------------------------


def test_flow_pipeline_eps_and_velocity_modes(flow_pipe):
    lam, steps = 1.1, 4
    kw = dict(num_inference_steps=steps, output_type="pt")
    base = images(flow_pipe, **kw)
    with apply_epsilon_scaling(flow_pipe, 1.0):
        assert torch.equal(images(flow_pipe, **kw), base)

    # eps mode against DDPMPipeline's loop written by hand with textbook ES.
    sched, unet = flow_pipe.scheduler, flow_pipe.unet
    g = gen()
    x = randn_tensor((1, 3, 8, 8), generator=g, dtype=torch.float32)
    sched.set_timesteps(steps)
    assert float(sched.sigmas[0]) == 1.0
    want = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            want.append(x.clone())
            u = es_flow(unet(x, t).sample, x, float(sched.sigmas[i]), lam)
            x = sched.step(u, t, x, generator=g).prev_sample
    want_img = (x / 2 + 0.5).clamp(0, 1)
    rec = InputRecorder(unet)
    with apply_epsilon_scaling(flow_pipe, lam) as handle:
        got = images(flow_pipe, **kw)
        assert handle.flow_mode == "eps"
    xs = rec.remove()
    assert_same_trajectory(xs, want)
    torch.testing.assert_close(got, want_img, **TOL)
    assert torch.equal(xs[1], want[1])  # t = 1 (sigma = inf) is left unscaled, exactly
    assert torch.isfinite(got).all()

    # velocity mode (ComfyUI's convention): u / lambda, by a hand-patched model.
    undo = patch_forward(unet, divide_output_by(lam))
    want_v = images(flow_pipe, **kw)
    undo()
    with apply_epsilon_scaling(flow_pipe, lam, flow_mode="velocity"):
        got_v = images(flow_pipe, **kw)
    torch.testing.assert_close(got_v, want_v, **TOL)
    assert (got_v - got).abs().max() > 1e-4

    assert torch.equal(images(flow_pipe, **kw), base)


def test_flow_cfg_loop_linear_schedule(flow_cfg_pipe):
    """SD3-style loop: one batched call on [cond, uncond], CFG, Euler step; ES after CFG."""
    pipe, steps, w = flow_cfg_pipe, 4, 3.0
    sched, unet = pipe.scheduler, pipe.unet
    linear = Linear(k=0.04, b=1.03)
    labels = torch.tensor([1, 2, 3, 3])  # cond for 2 samples, then the null class

    def run(es=None):
        x = randn_tensor((2, 3, 8, 8), generator=gen(), dtype=torch.float32)
        sched.set_timesteps(steps)
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                out = unet(torch.cat([x, x]), t.expand(4), class_labels=labels).sample
                cond, uncond = out.chunk(2)
                u = uncond + w * (cond - uncond)
                if es is not None:
                    u = es(u, x, i)
                x = sched.step(u, t, x).prev_sample
        return x

    base = run()
    with apply_epsilon_scaling(pipe, 1.0):
        assert torch.equal(run(), base)
    want = run(lambda u, x, i: es_flow(u, x, float(sched.sigmas[i]), linear.b + linear.k * (steps - 1 - i)))
    with apply_epsilon_scaling(pipe, linear) as handle:
        got = run()
        assert float(handle.last_lam[0]) == pytest.approx(linear.b)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - base).abs().max() > 1e-4
    assert torch.equal(run(), base)


# ---------------------------------------------------------------------------------------------
# Noise level seen by lambda: sigma = sqrt((1 - abar) / abar), the scheduler's own sigma table
# ---------------------------------------------------------------------------------------------


class _Stub(torch.nn.Module):
    def forward(self, sample, timestep):
        return (0.3 * sample,)


class _StubPipe:
    def __init__(self, scheduler):
        self.unet = _Stub()
        self.scheduler = scheduler


@pytest.mark.parametrize("name", [
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
])
def test_sigma_of_each_call_matches_the_scheduler_input_scaling(name):
    """k-diffusion-style schedulers feed the net x / sqrt(1 + sigma^2): recover sigma from that."""
    sched = getattr(diffusers, name)()
    pipe = _StubPipe(sched)
    handle = apply_epsilon_scaling(pipe, PerSigma((0.1, 10.0), (1.1, 1.2)))
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        implied_sq = float((x / x_in).flatten()[0]) ** 2 - 1  # the factor is computed in float32
        out = pipe.unet(x_in, t)[0]
        assert float(handle.last_sigma[0]) ** 2 == pytest.approx(implied_sq, rel=1e-5, abs=1e-6)
        x = sched.step(out, t, x).prev_sample
    handle.remove()


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_sigma_of_each_call_for_vp_timestep_schedulers(name):
    sched = getattr(diffusers, name)()
    pipe = _StubPipe(sched)
    handle = apply_epsilon_scaling(pipe, PerSigma((0.1, 10.0), (1.1, 1.2)))
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    for t in sched.timesteps:
        out = pipe.unet(x, t)[0]
        abar = float(sched.alphas_cumprod[int(t)])
        assert float(handle.last_sigma[0]) == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-5)
        x = sched.step(out, t, x).prev_sample
    handle.remove()


class _ChannelStub(torch.nn.Module):
    """Input [x_t (c), extra (e)] -> output of `out_channels`, a fixed function of the input."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels

    def forward(self, sample, timestep):
        return (torch.sin(sample.sum(1, keepdim=True) + torch.arange(self.out_channels).view(1, -1, 1, 1)),)


def test_extra_input_channels_and_learned_variance_with_extra_inputs():
    t = torch.tensor(500)
    x = torch.randn(2, 6, 4, 4)
    lam = 1.2

    # Inpainting-style: 6 input channels (3 of x_t, then conditioning), 3 output channels, v-prediction.
    pipe = _StubPipe(DDIMScheduler(prediction_type="v_prediction"))
    pipe.unet = _ChannelStub(3)
    raw = pipe.unet(x, t)[0]
    with apply_epsilon_scaling(pipe, lam):
        got = pipe.unet(x, t)[0]
    abar = float(pipe.scheduler.alphas_cumprod[500])
    torch.testing.assert_close(got, es_vp(raw, x[:, :3], abar, lam, "v_prediction"), **TOL)

    # DeepFloyd IF II-style: 6 in (x_t + upscaled image), 6 out (eps + learned variance).
    pipe = _StubPipe(DDPMScheduler(variance_type="learned_range"))
    pipe.unet = _ChannelStub(6)
    raw = pipe.unet(x, t)[0]
    with apply_epsilon_scaling(pipe, lam):
        got = pipe.unet(x, t)[0]
    torch.testing.assert_close(got[:, :3], raw[:, :3] / lam, **TOL)
    assert torch.equal(got[:, 3:], raw[:, 3:])


def test_package_import_does_not_import_diffusers():
    code = "import sys, epsscale.integrations; assert 'diffusers' not in sys.modules; print('ok')"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
