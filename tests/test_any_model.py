"""measure, calibrate and sample for every model source, with --data and a TorchScript extractor.

For each source (a guided-diffusion checkpoint, an EDM-format net, a diffusers DDIM pipeline and
a DiT pipeline, all tiny and made here): ``measure`` writes its curves from the given real images,
``calibrate`` writes a schedule JSON that records what it was tuned on, and ``sample
--eps-schedule`` reads it back (and warns, in one line, when it is used with another grid).
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from epsscale.cli import main
from epsscale.scaling import load_schedule

FIXTURES = Path(__file__).parent / "fixtures"


class Features(torch.nn.Module):
    """A domain feature extractor a user could bring: uint8 NCHW -> per-channel statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), pooled.amax((2, 3)), pooled.amin((2, 3))], 1)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ext") / "features.pt"
    torch.jit.save(torch.jit.script(Features()), str(path))
    return path


def _images(n: int, size: int, channels: int, seed: int, labels: bool = False) -> dict:
    """Smooth random images (not noise), so that the features and the FID have something to see."""
    g = np.random.default_rng(seed)
    base = g.normal(size=(n, 4, 4, channels))
    up = np.kron(base, np.ones((1, size // 4, size // 4, 1)))
    u8 = np.clip(127.5 + 60 * up + g.normal(scale=10, size=up.shape), 0, 255).astype(np.uint8)
    return {"arr_0": u8, **({"arr_1": g.integers(0, 10, n)} if labels else {})}


def _data(folder: Path, name: str, **kw) -> Path:
    path = folder / f"{name}.npz"
    np.savez(path, **_images(**kw))
    return path


def _run(argv: list, capsys) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the EDM pickle's warning
        code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[list, dict]]:
    """model options and data options of each source."""
    from conftest import FakeEDMNet
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("sources")
    out: dict[str, tuple[list, dict]] = {}
    # guided-diffusion: the tiny ADM fixture as a torch.save checkpoint.
    torch.save(load_file(str(FIXTURES / "adm_tiny" / "tiny_uncond.safetensors")), d / "adm.pt")
    flags = json.loads((FIXTURES / "adm_tiny" / "tiny_uncond.json").read_text())
    flag_text = " ".join(f"--{k} {v}" for k, v in flags.items()) + " --diffusion_steps 1000 --noise_schedule cosine --timestep_respacing 3"
    out["guided-diffusion"] = (["--guided-diffusion", d / "adm.pt", "--flags", flag_text], {"size": 32, "channels": 3})
    # EDM: a class-conditional duck-typed net at 3x8x8 (labels come with the data).
    (d / "edm.pkl").write_bytes(pickle.dumps({"ema": FakeEDMNet()}))
    out["edm"] = (["--edm", d / "edm.pkl", "--allow-pickle", "--sampler", "euler", "--steps", "3"], {"size": 8, "channels": 3, "labels": True})
    # diffusers: a DDIM pipeline (pixel space) and a DiT pipeline (latent, class-conditional, learned sigma).
    from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(d / "ddim")
    out["diffusers-ddim"] = (["--diffusers", d / "ddim", "--sampler", "ddim", "--steps", "3"], {"size": 8, "channels": 3})
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                        sample_size=4, patch_size=2, norm_num_groups=16, num_embeds_ada_norm=10)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(d / "dit")
    out["diffusers-dit"] = (["--diffusers", d / "dit", "--sampler", "ddpm", "--steps", "3"], {"size": 4, "channels": 3, "labels": True})  # the tiny VAE does not downsample
    return out


@pytest.mark.parametrize("source", ["guided-diffusion", "edm", "diffusers-ddim", "diffusers-dit"])
def test_measure_calibrate_sample_on_any_model(source, sources, extractor, tmp_path, capsys):
    model, data_kw = sources[source]
    data = _data(tmp_path, "data", n=24, seed=1, **data_kw)

    # measure: curves from the given real images, ES against lambda = 1.
    code, out, err = _run(["measure", *model, "--data", data, "--num", "12", "--eps-scale", "1.02", "--quiet", "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "m" / "exposure.json").read_text())
    assert doc["meta"]["data"] == str(data) and len(doc["delta_t"]["es"]) == len(doc["t"]) >= 1
    assert all(np.isfinite(doc["eps_norm"]["sampling"])) and doc["delta_t"]["baseline"] != doc["delta_t"]["es"]

    # calibrate: a 3-point FID grid over b with the user's extractor against the user's data.
    sched_path = tmp_path / "lam.json"
    code, out, err = _run(["calibrate", *model, "--data", data, "--extractor", extractor, "--search", "grid", "--lo", "0.98", "--hi", "1.02", "--points", "3",
                           "--fid-num", "12", "--quiet", "--out", sched_path], capsys)
    assert code == 0, err
    sched = load_schedule(sched_path)
    points = {float(k): v for k, v in sched.meta["points"].items()}
    assert sorted(points) == pytest.approx([0.98, 1.0, 1.02]) and sched.schedule.b == min(points, key=points.get)
    tuned = sched.meta["tuned_on"]
    assert tuned["data"] == str(data) and tuned["extractor"].startswith("torchscript-features") and tuned["method"] == "fid"
    assert tuned["sampler"] == sched.meta["sampler"] and tuned["steps"] == sched.meta["steps"] and tuned["fingerprint"]

    # sample reads the schedule, silently on the grid it was tuned on and with a warning on another.
    code, out, err = _run(["sample", *model, "--eps-schedule", sched_path, "--seeds", "0-3", "--quiet", "--out", tmp_path / "s.npz"], capsys)
    assert code == 0 and "warning" not in err, err
    got = np.load(tmp_path / "s.npz")["arr_0"]
    assert got.shape == (4, data_kw["size"], data_kw["size"], 3) and got.dtype == np.uint8
    other = ["--steps", "4"] if source != "guided-diffusion" else []
    if other:
        code, out, err = _run(["sample", *model, *other, "--eps-schedule", sched_path, "--seeds", "0-1", "--quiet", "--out", tmp_path / "t.npz"], capsys)
        assert code == 0 and len(err.strip().splitlines()) == 1 and "tuned for" in err and "4 steps" not in err, err


def test_data_of_the_wrong_size_or_channels_is_one_line(sources, tmp_path, capsys):
    model, _ = sources["diffusers-ddim"]
    for kw, needle in (({"size": 16, "channels": 3}, "8x8"), ({"size": 8, "channels": 1}, "3-channel")):
        data = _data(tmp_path, f"bad{kw['size']}{kw['channels']}", n=8, seed=0, **kw)
        code, out, err = _run(["measure", *model, "--data", data, "--num", "4", "--out", tmp_path / "m"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_other_models_need_data(sources, tmp_path, capsys):
    model, _ = sources["edm"]
    code, out, err = _run(["measure", *model, "--num", "4", "--out", tmp_path / "m"], capsys)
    assert code == 2 and "--data" in err, err
    code, out, err = _run(["calibrate", *model, "--out", tmp_path / "l.json"], capsys)
    assert code == 2 and "--data" in err, err


def test_a_broken_extractor_is_one_line(sources, tmp_path, capsys):
    model, data_kw = sources["diffusers-ddim"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    data = _data(tmp_path, "data", n=8, seed=0, **data_kw)
    code, out, err = _run(["calibrate", *model, "--data", data, "--extractor", bad, "--out", tmp_path / "l.json"], capsys)
    assert code == 2 and "TorchScript" in err and len(err.strip().splitlines()) == 1, err


def test_fid_with_a_torchscript_extractor(extractor, tmp_path, capsys):
    a = _data(tmp_path, "a", n=16, size=8, channels=3, seed=1)
    b = _data(tmp_path, "b", n=16, size=8, channels=3, seed=2)
    code, out, err = _run(["fid", a, "--ref", b, "--extractor", extractor, "--json", "--quiet"], capsys)
    assert code == 0, err
    fid = json.loads(out)["fid"]
    code, out, err = _run(["fid", a, "--ref", a, "--extractor", extractor, "--json", "--quiet"], capsys)
    assert code == 0 and json.loads(out)["fid"] < 1e-6 < fid  # the same images score 0, others do not


def test_a_class_conditional_unet_pipeline_takes_labels_and_no_clip(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64), num_class_embeds=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=True, clip_sample_range=0.5)).save_pretrained(tmp_path / "p")
    base = ["sample", "--diffusers", tmp_path / "p", "--steps", "3", "--seeds", "0-3", "--quiet"]
    code, out, err = _run([*base, "--labels", "0,1,2,3", "--out", tmp_path / "a.npz"], capsys)
    assert code == 0, err
    z = np.load(tmp_path / "a.npz")
    assert z["arr_1"].tolist() == [0, 1, 2, 3]
    code, out, err = _run([*base, "--labels", "0,1,2,4", "--out", tmp_path / "b.npz"], capsys)
    assert code == 2 and "[0, 4)" in err, err  # the model's own number of classes
    # The scheduler clips x0 to [-0.5, 0.5] unless told otherwise; --no-clip turns it off.
    from epsscale.integrations.pipelines import build_plan

    assert build_plan(tmp_path / "p", sampler="ddpm", steps=3).sampler_opts["clip"] == 0.5
    assert build_plan(tmp_path / "p", sampler="ddpm", steps=3, sampler_opts={"clip": None}).sampler_opts["clip"] is None
    code, out, err = _run([*base, "--no-clip", "--out", tmp_path / "c.npz"], capsys)
    assert code == 0, err


def test_prompt_file_refusals_are_one_line(sources, tmp_path, capsys):
    """--prompt-file: an unreadable or empty file, and a pipeline that takes no prompts, are one-line errors."""
    model, _ = sources["diffusers-ddim"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shoe\n\na bag\n")
    cases = ((tmp_path / "missing.txt", "cannot read it"), (empty, "holds no prompts"), (prompts, "is for text-to-image pipelines"))
    for path, needle in cases:
        code, out, err = _run(["sample", *model, "--prompt-file", path, "--seeds", "0-1", "--out", tmp_path / "s.npz"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "s.npz").exists()


def _gpt2_byte_chars() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE vocabulary is written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, map(chr, keep))) | {b: chr(256 + i) for i, b in enumerate(moved)}
    return [table[b] for b in range(256)]


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline saved to disk: CLIP text encoder, a character-level tokenizer (no merges),
    a cross-attention UNet and a VAE, all at random initialisation."""
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    d = tmp_path_factory.mktemp("sd")
    chars = _gpt2_byte_chars()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(d / "pipe")
    return d / "pipe"


def test_a_text_to_image_pipeline_cycles_prompts_over_seeds(text_pipeline, extractor, tmp_path, capsys):
    """--prompt-file on a real StableDiffusionPipeline: seed i takes prompt i mod n; guidance and ES change the samples;
    calibrate tunes b with the prompts and sample reads its schedule."""
    two, one = tmp_path / "two.txt", tmp_path / "one.txt"
    two.write_text("a shoe\na bag\n")
    one.write_text("a shoe\na shoe\n")  # the same number of prompts: the text encoder sees the same batch shape
    base = ["--diffusers", text_pipeline, "--sampler", "ddim", "--steps", "3"]

    def sample(prompts: Path, name: str, *extra) -> np.ndarray:
        code, out, err = _run(["sample", *base, "--prompt-file", prompts, "--seeds", "0-3", "--quiet", *extra, "--out", tmp_path / name], capsys)
        assert code == 0, err
        return np.load(tmp_path / name)["arr_0"].astype(int)

    a, b = sample(two, "a.npz"), sample(one, "b.npz")
    assert a.shape == (4, 16, 16, 3)
    diff = np.abs(a - b).reshape(4, -1).max(1)
    # Seeds 0 and 2 take "a shoe" in both runs (at most one uint8 level of round-off apart); seeds 1 and 3 take
    # "a bag" in one run only, which a random text encoder still turns into visibly different images.
    assert diff[0] <= 1 and diff[2] <= 1 and diff[1] > 8 and diff[3] > 8, diff
    guided = sample(two, "g.npz", "--guidance-scale", "3")
    scaled = sample(two, "e.npz", "--guidance-scale", "3", "--eps-scale", "1.05")
    assert np.abs(guided - a).max() > 8 and np.abs(scaled - guided).max() > 0

    data = _data(tmp_path, "data", n=12, size=16, channels=3, seed=2)
    sched_path = tmp_path / "lam.json"
    code, out, err = _run(["calibrate", *base, "--prompt-file", two, "--data", data, "--extractor", extractor, "--search", "grid",
                           "--lo", "0.98", "--hi", "1.02", "--points", "3", "--fid-num", "8", "--quiet", "--out", sched_path], capsys)
    assert code == 0, err
    assert sorted(float(k) for k in load_schedule(sched_path).meta["points"]) == pytest.approx([0.98, 1.0, 1.02])
    read = sample(two, "s.npz", "--eps-schedule", sched_path)
    assert read.shape == (4, 16, 16, 3)
