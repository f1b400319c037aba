"""Presets against the paper's tables (transcribed here independently from docs/paper.md)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from epsscale import Linear, Uniform, VPSchedule, eps_scaling, sigmas_karras
from epsscale.models.adm import create_adm_model
from epsscale.models.adm_classifier import create_adm_classifier
from epsscale.presets import PRESETS, get_preset, preset_names
from epsscale.samplers import SAMPLERS

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"

# docs/paper.md, "Results tables", ADM: T' -> uniform b, and the 20-step ES* (k, b).
ADM_LAMBDA = {
    "adm-cifar10": {100: 1.017, 50: 1.017, 20: 1.017},
    "adm-lsun-tower64": {100: 1.006, 50: 1.007, 20: 1.011},
    "adm-ffhq128": {100: 1.005, 50: 1.007, 20: 1.008},
    "adm-imagenet64": {100: 1.006, 50: 1.006, 20: 1.006},
    "adm-imagenet128": {100: 1.004, 50: 1.004, 20: 1.005},
}
ADM_LINEAR_20 = {
    "adm-cifar10": (0.0025, 1.0),
    "adm-lsun-tower64": (0.0008, 1.0034),
    "adm-ffhq128": (0.0004, 1.0042),
    "adm-imagenet64": (0.0002, 1.0041),
    "adm-imagenet128": (0.00022, 1.00291),
}
# (baseline FID, ES FID) per T', then ES* at 20.
ADM_FID = {
    "adm-cifar10": {100: (3.37, 2.17), 50: (4.43, 2.49), 20: (10.36, 5.15), "20*": 4.31},
    "adm-lsun-tower64": {100: (3.59, 2.91), 50: (7.28, 3.68), 20: (23.92, 8.22), "20*": 7.60},
    "adm-ffhq128": {100: (14.52, 6.77), 50: (26.15, 9.50), 20: (59.35, 26.14), "20*": 24.83},
    "adm-imagenet64": {100: (2.71, 2.39), 50: (3.75, 3.07), 20: (10.96, 7.52), "20*": 7.37},
    "adm-imagenet128": {100: (3.55, 3.37), 50: (5.15, 4.33), 20: (12.48, 9.95), "20*": 9.86},
}
ADM_FIXTURE = {
    "adm-cifar10": "cifar10", "adm-lsun-tower64": "lsun_tower64", "adm-ffhq128": "ffhq128",
    "adm-imagenet64": "imagenet64", "adm-imagenet128": "imagenet128",
}  # fmt: skip
ADM_NOISE_SCHEDULE = {
    "adm-cifar10": "cosine", "adm-lsun-tower64": "cosine", "adm-ffhq128": "cosine",
    "adm-imagenet64": "cosine", "adm-imagenet128": "linear",
}  # fmt: skip

# docs/paper.md, "Results tables", EDM: (sampler, EDM --steps) -> (NFE, uncond b, cond b).
EDM_LAMBDA = {
    ("heun", 18): (35, 1.0005, 1.0006),
    ("heun", 11): (21, 0.9985, 0.9983),
    ("heun", 7): (13, 1.0060, 1.0070),
    ("euler", 35): (35, 1.0034, 1.0035),
    ("euler", 21): (21, 1.0043, 1.0045),
    ("euler", 13): (13, 1.0048, 1.0051),
}
# NFE -> (uncond heun, uncond euler, cond heun, cond euler) as (baseline, ES).
EDM_FID = {
    35: ((1.97, 1.95), (3.81, 2.80), (1.82, 1.80), (3.74, 2.59)),
    21: ((2.33, 2.24), (6.29, 4.32), (2.17, 2.08), (5.91, 3.74)),
    13: ((7.16, 6.54), (12.28, 8.39), (6.69, 6.16), (10.66, 6.59)),
}


def test_names() -> None:
    assert preset_names() == [*ADM_LAMBDA, "edm-cifar10-uncond", "edm-cifar10-cond"]
    for name in PRESETS:
        assert PRESETS[name]["source"]  # provenance of the raw entry


# ---------------------------------------------------------------------------------------------
# Lambda and FID tables.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADM_LAMBDA))
def test_adm_lambda_matches_paper(name: str) -> None:
    for steps, b in ADM_LAMBDA[name].items():
        p = get_preset(name, steps=steps)
        assert p["sampler"] == "ddpm" and p["steps"] == steps and p["nfe"] == steps
        assert p["lam"] == Uniform(b)
        assert p["fid"] == {"baseline": ADM_FID[name][steps][0], "es": ADM_FID[name][steps][1]}
        assert f"T'={steps}" in p["provenance"] and f"b={b}" in p["provenance"]
    k, b = ADM_LINEAR_20[name]
    p = get_preset(name, steps=20, es="linear")
    assert p["lam"] == Linear(k, b)
    assert p["fid"] == {"baseline": ADM_FID[name][20][0], "es": ADM_FID[name]["20*"]}
    assert "linear" in p["provenance"]
    assert get_preset(name)["steps"] == 100  # the default is the paper's headline T'


def test_linear_schedules_keep_the_mean_at_uniform_b() -> None:
    """docs/paper.md, "λ schedules": the 20-step (k, b) pairs keep mean(lambda) at the best uniform b for 4 of 5."""
    # Equal as decimals; b + 9.5 k in float64 is within a few ulp (~1e-15) of the decimal value.
    same = [n for n, (k, b) in ADM_LINEAR_20.items() if abs(b + k * 9.5 - ADM_LAMBDA[n][20]) < 1e-9]
    assert same == ["adm-lsun-tower64", "adm-ffhq128", "adm-imagenet64", "adm-imagenet128"]
    for name in same:
        lam = get_preset(name, steps=20, es="linear")["lam"]
        # A mean of 20 float64 values ~1: within 20 eps (4e-15) of the decimal b.
        assert lam.values(20).mean().item() == pytest.approx(get_preset(name, steps=20)["lam"].b, abs=1e-12)


@pytest.mark.parametrize("cond", [False, True])
def test_edm_lambda_matches_paper(cond: bool) -> None:
    name = "edm-cifar10-cond" if cond else "edm-cifar10-uncond"
    for (sampler, steps), (nfe, b_uncond, b_cond) in EDM_LAMBDA.items():
        p = get_preset(name, sampler=sampler, steps=steps)
        assert p["nfe"] == nfe
        assert p["lam"] == Uniform(b_cond if cond else b_uncond)
        column = 2 * cond + (sampler == "euler")
        assert p["fid"] == dict(zip(("baseline", "es"), EDM_FID[nfe][column]))
        assert p["conditional"] is cond
        assert p["checkpoint"].endswith(f"edm-cifar10-32x32-{'cond' if cond else 'uncond'}-vp.pkl")
    assert get_preset(name)["sampler"] == "heun" and get_preset(name)["steps"] == 18
    assert get_preset(name, sampler="euler")["steps"] == 35


# ---------------------------------------------------------------------------------------------
# Model flags, grids and sampler keywords.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADM_FIXTURE))
def test_adm_flags_build_the_reference_network(name: str) -> None:
    reference = json.loads((FIXTURES / "adm_keys" / f"{ADM_FIXTURE[name]}.json").read_text())
    p = get_preset(name, steps=50)
    with torch.device("meta"):
        model = create_adm_model(p["model_flags"])
        # The whole flag set of image_sample.py (model + diffusion flags) is accepted as well.
        again = create_adm_model({**p["model_flags"], **p["diffusion_flags"]})
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(reference["state_dict"])
    assert ours == reference["state_dict"]
    assert sum(t.numel() for t in model.parameters()) == reference["num_params"]
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # The flags the fixture was recorded with agree with ours.
    for flag, value in reference["flags"].items():
        assert p["model_flags"].get(flag, value) == value, flag


@pytest.mark.parametrize("name", list(ADM_FIXTURE))
def test_adm_diffusion_and_sampler(name: str) -> None:
    for steps in (100, 50, 20):
        p = get_preset(name, steps=steps)
        d = p["diffusion_flags"]
        assert d["diffusion_steps"] == 1000 and d["learn_sigma"] is True and p["model_flags"]["learn_sigma"] is True
        assert d["noise_schedule"] == ADM_NOISE_SCHEDULE[name] and d["timestep_respacing"] == str(steps)
        assert p["schedule"] == VPSchedule(ADM_NOISE_SCHEDULE[name], 1000)
        torch.testing.assert_close(p["sigmas"], VPSchedule(ADM_NOISE_SCHEDULE[name]).grid(str(steps)), rtol=0, atol=0)
        assert len(p["sigmas"]) == steps + 1 and p["sigmas"][-1] == 0
        assert p["sampler_kwargs"] == {"variance": "learned_range", "clip": 1.0}
        inspect.signature(SAMPLERS["ddpm"]).bind(None, None, None, **p["sampler_kwargs"])
    assert get_preset(name)["conditional"] is name.startswith("adm-imagenet")


def test_imagenet128_classifier_guidance() -> None:
    p = get_preset("adm-imagenet128", steps=100)
    g = p["guidance"]
    assert g["kind"] == "classifier" and g["scale"] == 0.5
    assert g["classifier_checkpoint"].endswith("128x128_classifier.pt")
    with torch.device("meta"):
        clf = create_adm_classifier(g["classifier_flags"])
    keys = [l.split()[0] for l in (FIXTURES / "adm_classifier128_keys.txt").read_text().splitlines() if l and l[0] != "#"]
    assert list(clf.state_dict()) == keys
    for name in ADM_LAMBDA:
        if name != "adm-imagenet128":
            assert get_preset(name)["guidance"] is None


@pytest.mark.parametrize("name", ["edm-cifar10-uncond", "edm-cifar10-cond"])
def test_edm_grid_and_sampler(name: str) -> None:
    for (sampler, steps), _ in EDM_LAMBDA.items():
        p = get_preset(name, sampler=sampler, steps=steps)
        assert p["grid"] == {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
        torch.testing.assert_close(p["sigmas"], sigmas_karras(steps, 0.002, 80.0, 7.0), rtol=0, atol=0)
        assert p["sigmas"][0] == 80.0 and p["sigmas"][-2].item() == pytest.approx(0.002) and p["sigmas"][-1] == 0
        assert p["sampler_kwargs"]["s_churn"] == 0.0  # deterministic, as in the paper
        inspect.signature(SAMPLERS[sampler]).bind(None, None, None, **p["sampler_kwargs"])


def test_linear_preset_binds_to_its_grid() -> None:
    p = get_preset("adm-cifar10", steps=20, es="linear")
    den = eps_scaling(lambda x, sigma, **c: x * 0, p["lam"], sigmas=p["sigmas"])
    lam = den.lam(p["sigmas"][:-1])
    expected = 1.0 + 0.0025 * torch.arange(19, -1, -1, dtype=torch.float64)  # i = 19 first, 0 last
    torch.testing.assert_close(lam, expected, rtol=0, atol=1e-12)  # b + k i: 2 roundings of ~1 (4e-16)


# ---------------------------------------------------------------------------------------------
# Errors and immutability.
# ---------------------------------------------------------------------------------------------


def test_errors_list_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="adm-cifar10.*edm-cifar10-cond"):
        get_preset("adm-cifar100")
    with pytest.raises(ValueError, match="100, 50, 20"):
        get_preset("adm-cifar10", steps=25)
    with pytest.raises(ValueError, match=r"18 \(NFE 35\), 11 \(NFE 21\), 7 \(NFE 13\)"):
        get_preset("edm-cifar10-cond", steps=35)  # NFE 35 is steps=18 for Heun
    with pytest.raises(ValueError, match="35, 21, 13"):
        get_preset("edm-cifar10-cond", sampler="euler", steps=18)
    with pytest.raises(ValueError, match="heun, euler"):
        get_preset("edm-cifar10-uncond", sampler="ddpm")
    with pytest.raises(ValueError, match="ddpm"):
        get_preset("adm-ffhq128", sampler="heun")
    with pytest.raises(ValueError, match="steps=20"):
        get_preset("adm-ffhq128", steps=50, es="linear")
    with pytest.raises(ValueError, match="none"):
        get_preset("edm-cifar10-cond", es="linear")
    with pytest.raises(ValueError, match="'uniform' or 'linear'"):
        get_preset("adm-ffhq128", es="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        get_preset("adm-ffhq128", steps=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as err:
        get_preset("nope")
    assert "\n" not in str(err.value)  # one line


def test_results_are_fresh_copies_and_the_table_is_read_only() -> None:
    p = get_preset("adm-imagenet128", steps=20)
    p["model_flags"]["num_channels"] = 1
    p["guidance"]["scale"] = 10.0
    q = get_preset("adm-imagenet128", steps=20)
    assert q["model_flags"]["num_channels"] == 256 and q["guidance"]["scale"] == 0.5
    with pytest.raises(TypeError):
        PRESETS["adm-cifar10"]["lam"]["ddpm"][100] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["adm-cifar10"] = {}  # type: ignore[index]
