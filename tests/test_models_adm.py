"""Our ADM UNet against guided-diffusion: parameter names and shapes, outputs, loading errors.

The fixtures were recorded from guided-diffusion as forked by ADM-ES (see tests/fixtures/adm_*):
`adm_keys/` holds the state-dict layout of the paper's five ADM settings, `adm_tiny/` two small
random networks with their outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from epsscale.models import ADMUNet, create_adm_model, load_adm_state_dict
from epsscale.models.adm import default_channel_mult
from epsscale.models.adm_blocks import AttentionBlock, timestep_embedding

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
PRESETS = ["cifar10", "lsun_tower64", "ffhq128", "imagenet64", "imagenet128"]
TINY = ["tiny_cond", "tiny_uncond"]


def _tiny(name: str) -> tuple[ADMUNet, dict[str, torch.Tensor]]:
    """The tiny reference network, loaded, and its recorded forward pass."""
    flags = json.loads((FIXTURES / "adm_tiny" / f"{name}.json").read_text())
    model = create_adm_model(flags)
    load_adm_state_dict(model, load_file(FIXTURES / "adm_tiny" / f"{name}.safetensors"))
    return model.eval(), load_file(FIXTURES / "adm_tiny" / f"{name}_forward.safetensors")


# ---------------------------------------------------------------------------------------------
# Architecture: the same keys and shapes as guided-diffusion.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_reference_keys_and_shapes(preset: str) -> None:
    reference = json.loads((FIXTURES / "adm_keys" / f"{preset}.json").read_text())
    # On the meta device the 0.5B-parameter models allocate nothing.
    with torch.device("meta"):
        model = create_adm_model(reference["flags"])
    assert all(p.is_meta for p in model.parameters())

    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(reference["state_dict"])  # same keys, same order
    assert ours == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


def test_default_channel_mult_by_image_size() -> None:
    assert default_channel_mult(32) == (1, 2, 2, 2)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(512) == (0.5, 1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        create_adm_model({"image_size": 48})

    # 512: the first level has int(0.5 * C) channels (OpenAI's 512x512 ImageNet model).
    flags = {"image_size": 512, "num_channels": 256, "num_head_channels": 64,
             "attention_resolutions": "32,16,8", "learn_sigma": True,
             "class_cond": True}  # fmt: skip
    with torch.device("meta"):
        model = create_adm_model(flags)
    assert model.input_blocks[0][0].weight.shape == (128, 3, 3, 3)
    assert model.out[2].weight.shape == (6, 128, 3, 3)
    assert model.label_emb.weight.shape == (1000, 1024)


def test_flags_as_command_line_strings() -> None:
    typed = json.loads((FIXTURES / "adm_tiny" / "tiny_cond.json").read_text())
    as_strings = {k: str(v) for k, v in typed.items()}
    # Diffusion and sampling flags of image_sample.py are accepted and ignored.
    as_strings |= {"diffusion_steps": "1000", "noise_schedule": "cosine", "use_fp16": "True",
                   "use_checkpoint": "False", "timestep_respacing": "ddim25"}  # fmt: skip
    with torch.device("meta"):
        a, b = create_adm_model(typed), create_adm_model(as_strings)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_in_channels_and_learn_sigma() -> None:
    flags = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "in_channels": 1,
             "attention_resolutions": "8", "channel_mult": "1,2"}  # fmt: skip
    with torch.device("meta"):
        assert create_adm_model(flags).out[2].weight.shape[0] == 1
        assert create_adm_model(flags | {"learn_sigma": "true"}).out[2].weight.shape[0] == 2
    assert create_adm_model(flags)(torch.randn(2, 1, 32, 32), torch.tensor([0, 5])).shape == (
        2, 1, 32, 32,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"num_head_channel": 64}, "num_head_channel"),  # a typo
        ({"learn_sigma": "maybe"}, "learn_sigma"),
        ({"attention_resolutions": "16;8"}, "attention_resolutions"),
        ({"num_channels": "wide"}, "num_channels"),
    ],
)
def test_bad_flags_name_the_flag(flags: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"'{named}'"):
        create_adm_model(flags)


def test_config_round_trip() -> None:
    with torch.device("meta"):
        model = create_adm_model({"image_size": 32, "num_channels": 64, "class_cond": True,
                                  "num_heads_upsample": 2, "resblock_updown": True})  # fmt: skip
        again = ADMUNet(**model.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert again.config == model.config


# ---------------------------------------------------------------------------------------------
# Numerics: the recorded guided-diffusion outputs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_matches_reference(name: str) -> None:
    model, ref = _tiny(name)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref.get("y"))
    # Measured: max |Δ| ≈ 1.3e-6 (cond) and 1.8e-6 (uncond) for outputs of size ~1.
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    assert (out - ref["out"]).norm() / ref["out"].norm() < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_channels_last(name: str) -> None:
    model, ref = _tiny(name)
    model = model.to(memory_format=torch.channels_last)
    x = ref["x"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x, ref["t"], ref.get("y"))
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)


def test_meta_build_then_assign_load() -> None:
    """The memory-saving route for big checkpoints: build on meta, then assign the tensors."""
    flags = json.loads((FIXTURES / "adm_tiny" / "tiny_uncond.json").read_text())
    with torch.device("meta"):
        model = create_adm_model(flags)
    state = load_file(FIXTURES / "adm_tiny" / "tiny_uncond.safetensors")
    load_adm_state_dict(model, state, assign=True).eval()
    ref = load_file(FIXTURES / "adm_tiny" / "tiny_uncond_forward.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"], ref["t"]), ref["out"], rtol=1e-5, atol=1e-5)


def _einsum_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's attention formula, written out plainly on [B, C, T]."""
    b, c, *spatial = x.shape
    heads = block.num_heads
    ch, t = c // heads, math.prod(spatial)
    x = x.reshape(b, c, t)
    qkv = F.conv1d(block.norm(x), block.qkv.weight, block.qkv.bias)  # [B, 3C, T]
    if block.use_new_attention_order:
        q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, t)
    return (x + F.conv1d(a, block.proj_out.weight, block.proj_out.bias)).reshape(b, c, *spatial)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_matches_einsum_formula(new_order: bool) -> None:
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order)
    torch.nn.init.normal_(block.proj_out.weight, std=0.2)  # it starts at zero
    x = torch.randn(2, 64, 8, 6)
    with torch.no_grad():
        ref = _einsum_attention(block, x)
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(block(x_cl), ref, rtol=1e-5, atol=1e-5)
        # The two layouts really differ, so the check above tells them apart.
        block.use_new_attention_order = not new_order
        assert (block(x) - ref).abs().max() > 1e-3


def test_timestep_embedding_formula() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 7)
    freqs = torch.exp(-math.log(10000) * torch.arange(3, dtype=torch.float64) / 3)
    args = t[:, None].double() * freqs
    expected = torch.cat([args.cos(), args.sin(), torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    assert emb.shape == (3, 7) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-4)  # float32 phase at t=999


def test_timestep_embedding_rounds_like_guided_diffusion() -> None:
    # guided-diffusion computes its float32 frequencies as (-log P * arange(h)) / h; at some widths
    # (192: ImageNet-64 and LSUN) -log P * (arange(h) / h) rounds differently, by up to 3e-5.
    t = torch.tensor([0, 1, 500, 999])
    for dim in (7, 32, 128, 192, 256):
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        ref = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        assert torch.equal(timestep_embedding(t, dim)[:, : 2 * half], ref), dim


def test_a_half_precision_model_runs() -> None:
    flags = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "in_channels": 1,
             "attention_resolutions": "4", "channel_mult": "1,2", "learn_sigma": True}  # fmt: skip
    torch.manual_seed(0)
    model = create_adm_model(flags)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    full = model(x, t)
    half = model.half()(x.half(), t)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=0, atol=5e-2)


def test_forward_checks_labels() -> None:
    model, ref = _tiny("tiny_cond")
    with pytest.raises(ValueError, match="class-conditional"):
        model(ref["x"], ref["t"])
    with pytest.raises(ValueError, match="y must have shape"):
        model(ref["x"], ref["t"], ref["y"][:2])
    uncond, ref = _tiny("tiny_uncond")
    with pytest.raises(ValueError, match="class-conditional"):
        uncond(ref["x"], ref["t"], torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Loading errors: one line per offending key, naming it.
# ---------------------------------------------------------------------------------------------


def test_wrong_key_is_named() -> None:
    model, _ = _tiny("tiny_uncond")
    state = dict(model.state_dict())
    state["middle_block.1.qkv.kernel"] = state.pop("middle_block.1.qkv.weight")
    with pytest.raises(ValueError) as err:
        load_adm_state_dict(model, state)
    message = str(err.value)
    assert "missing key 'middle_block.1.qkv.weight': expected [192, 64, 1]" in message
    assert "unexpected key 'middle_block.1.qkv.kernel': got [192, 64, 1]" in message


def test_wrong_shape_is_named() -> None:
    model, _ = _tiny("tiny_cond")
    state = dict(model.state_dict())
    state["out.2.weight"] = torch.zeros(3, 32, 3, 3)  # a learn_sigma=False checkpoint
    with pytest.raises(ValueError) as err:
        load_adm_state_dict(model, state)
    message = str(err.value)
    assert "wrong shape 'out.2.weight': expected [6, 32, 3, 3], got [3, 32, 3, 3]" in message
    assert "learn_sigma" in message


def test_class_cond_mismatch_hint_and_ddp_prefix() -> None:
    model, _ = _tiny("tiny_uncond")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    load_adm_state_dict(model, state)  # a DistributedDataParallel state dict loads as is
    state = dict(model.state_dict()) | {"label_emb.weight": torch.zeros(1000, 128)}
    with pytest.raises(ValueError, match="class_cond"):
        load_adm_state_dict(model, state)
