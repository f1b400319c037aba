"""guided-diffusion checkpoints through ``epsscale sample --guided-diffusion CKPT --flags ...``.

The oracle below is guided-diffusion's respaced ``p_sample_loop`` / ``ddim_sample_loop`` with
ADM-ES's eps division, written out from the published algorithm in guided-diffusion's own
arithmetic (float64 tables extracted to float32, VP state in float32), fed the same per-seed
noise. The one-step fixtures in test_reference_adm.py tie this arithmetic to the real code.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from epsscale.cli import main
from epsscale.integrations.guided_diffusion import parse_flags, run_settings
from epsscale.models import create_adm_model, load_adm_state_dict
from epsscale.samplers import StackedGenerator
from epsscale.schedules import VPSchedule, space_timesteps

TINY = FIXTURES / "adm_tiny"
MODEL_FLAGS = "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_head_channels 16 --attention_resolutions 16 --resblock_updown True --use_new_attention_order True --learn_sigma True --dropout 0.0 --use_scale_shift_norm True --class_cond False"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("gd") / "tiny_uncond.pt"
    torch.save(load_file(str(TINY / "tiny_uncond.safetensors")), p)
    return p


def oracle(net, seeds, respacing, use_ddim, eps_scaler, clip=True, variance="learned_range"):
    """guided-diffusion's p_sample_loop / ddim_sample_loop with ADM-ES's eps_scaler, in numpy tables."""
    base = VPSchedule("cosine")
    kept = space_timesteps(1000, respacing)
    ac_full = base.alphas_cumprod.numpy()
    ac = ac_full[kept]
    last, betas = 1.0, []
    for a in ac:
        betas.append(1 - a / last)
        last = a
    betas = np.array(betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1 - ac)
    coef2 = (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    f32 = lambda arr, t: torch.tensor(arr[t], dtype=torch.float32)

    gen = StackedGenerator(seeds)
    img = gen.randn((len(seeds), 3, 32, 32))
    for t in reversed(range(len(kept))):
        with torch.no_grad():
            out = net(img, torch.full((len(seeds),), kept[t]))
        eps, v = out[:, :3] / eps_scaler, out[:, 3:]  # v: learned range (absent without learn_sigma)
        x0 = f32(np.sqrt(1 / ac), t) * img - f32(np.sqrt(1 / ac - 1), t) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        noise = gen.randn_like(img)
        if not use_ddim:
            if variance == "learned_range":
                frac = (v + 1) / 2
                logvar = frac * f32(np.log(betas), t) + (1 - frac) * f32(post_logvar_clipped, t)
            elif variance == "fixed_large":  # guided-diffusion: append(posterior_variance[1], betas[1:])
                logvar = f32(np.log(np.append(post_var[1], betas[1:])), t).expand_as(img)
            else:
                logvar = f32(post_logvar_clipped, t).expand_as(img)
            mean = f32(coef1, t) * x0 + f32(coef2, t) * img
            img = mean + (0.0 if t == 0 else 1.0) * torch.exp(0.5 * logvar) * noise
        else:
            eps_re = (f32(np.sqrt(1 / ac), t) * img - x0) / f32(np.sqrt(1 / ac - 1), t)
            img = x0 * f32(np.sqrt(ac_prev), t) + f32(np.sqrt(1 - ac_prev), t) * eps_re
    return ((img + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("use_ddim", [False, True])
@pytest.mark.parametrize("eps_scaler", [None, 1.017])
def test_cli_reproduces_adm_es_seed_for_seed(ckpt, tmp_path, use_ddim, eps_scaler):
    flags = f"{MODEL_FLAGS} --noise_schedule cosine --diffusion_steps 1000 --timestep_respacing 10 --use_ddim {use_ddim} --clip_denoised True --batch_size 3 --num_samples 5"
    if eps_scaler is not None:
        flags += f" --eps_scaler {eps_scaler}"
    out = tmp_path / "s.npz"
    assert main(["sample", "--guided-diffusion", str(ckpt), "--flags", flags, "--out", str(out), "--quiet"]) == 0
    ours = np.load(out)
    assert ours["arr_0"].shape == (5, 32, 32, 3) and ours["arr_0"].dtype == np.uint8
    assert "arr_1" not in ours.files
    net = create_adm_model(json.loads((TINY / "tiny_uncond.json").read_text()))
    load_adm_state_dict(net, load_file(str(TINY / "tiny_uncond.safetensors")))
    ref = oracle(net.eval(), list(range(5)), "10", use_ddim, eps_scaler or 1.0)
    # The same float32 algebra, but not the same order of operations (nor the same batch shape for
    # the network: 3 rows against 5), so values before quantisation differ by float32 rounding
    # (~1e-5 of a level), and one that lands that close to a step moves one level: measured, 1
    # pixel in 92160 (30 samples). A wrong formula moves many pixels by more.
    diff = np.abs(ours["arr_0"].astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_seeds_take_precedence_and_match_subsets(ckpt, tmp_path):
    flags = f"{MODEL_FLAGS} --noise_schedule cosine --timestep_respacing 4 --num_samples 100"
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    # At one batch size a sample depends only on its seed, bit for bit (batches are padded to the
    # batch size; another batch size may round the network differently, see epsscale.distributed):
    # seed 2 is the last row of a's first batch [0, 1, 2] and the first of b's [2, 3, 3].
    assert main(["sample", "--guided-diffusion", str(ckpt), "--flags", flags, "--seeds", "0-3", "--batch", "3", "--out", str(a), "--quiet"]) == 0
    assert main(["sample", "--guided-diffusion", str(ckpt), "--flags", flags, "--seeds", "2-3", "--batch", "3", "--out", str(b), "--quiet"]) == 0
    assert len(np.load(a)["arr_0"]) == 4
    np.testing.assert_array_equal(np.load(a)["arr_0"][2:], np.load(b)["arr_0"])


@pytest.mark.parametrize("bad,needle", [("--eps_scaler 0.0", "eps_scaler"), ("--eps_scaler -1", "eps_scaler"), ("--eps_scaler nan", "eps_scaler"), ("--use_ddim maybe", "use_ddim"), ("--timestep_respacing 2000", "cannot take"), ("--num_channel 32", "num_channel")])
def test_bad_flags_one_line(ckpt, tmp_path, capsys, bad, needle):
    code = main(["sample", "--guided-diffusion", str(ckpt), "--flags", f"{MODEL_FLAGS} --noise_schedule cosine {bad}", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_wrong_checkpoint_names_the_key(tmp_path, capsys):
    sd = load_file(str(TINY / "tiny_uncond.safetensors"))
    sd["out.2.weight"] = sd["out.2.weight"][:3]
    p = tmp_path / "bad.pt"
    torch.save(sd, p)
    code = main(["sample", "--guided-diffusion", str(p), "--flags", f"{MODEL_FLAGS} --noise_schedule cosine", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "out.2.weight" in err and len(err.strip().splitlines()) == 1
    p.write_bytes(b"not a checkpoint")
    assert main(["sample", "--guided-diffusion", str(p), "--flags", f"{MODEL_FLAGS}", "--out", str(tmp_path / "x.npz")]) == 2


def test_flag_parsing():
    f = parse_flags("--a 1 --b=two --use_ddim True")
    assert f == {"a": "1", "b": "two", "use_ddim": "True"}
    st = run_settings({"timestep_respacing": "ddim25", "use_ddim": "True"})
    assert st.sampler == "ddim" and st.respacing == "ddim25" and st.lam == 1.0
    with pytest.raises(ValueError):
        parse_flags("--dangling")


def test_preset_supplies_the_papers_flags(ckpt, tmp_path, capsys):
    # The tiny checkpoint does not fit CIFAR-10's ADM: the preset's flags were applied.
    code = main(["sample", "--guided-diffusion", str(ckpt), "--preset", "adm-cifar10", "--steps", "100", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "ADMUNet" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "--guided-diffusion", str(ckpt), "--preset", "adm-cifar10", "--steps", "33", "--out", str(tmp_path / "x.npz")]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["sample", "--preset", "adm-cifar10", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--guided-diffusion" in capsys.readouterr().err


@pytest.mark.parametrize("sigma_small, variance", [(None, "fixed_large"), ("True", "fixed_small")])
def test_fixed_variance_checkpoints_sample_like_guided_diffusion(tmp_path, sigma_small, variance):
    # learn_sigma False: guided-diffusion's default is the large variance (beta_t), sigma_small the posterior's.
    flags = {**json.loads((TINY / "tiny_uncond.json").read_text()), "learn_sigma": False}
    torch.manual_seed(0)
    net = create_adm_model(flags)
    with torch.no_grad():
        net.out[-1].weight.normal_(0, 0.02)  # not ADM's zero init: the network must matter
    torch.save(net.state_dict(), tmp_path / "nols.pt")
    text = MODEL_FLAGS.replace("--learn_sigma True", "--learn_sigma False") + " --noise_schedule cosine --timestep_respacing 10 --num_samples 3"
    if sigma_small:
        text += f" --sigma_small {sigma_small}"
    out = tmp_path / "s.npz"
    assert main(["sample", "--guided-diffusion", str(tmp_path / "nols.pt"), "--flags", text, "--out", str(out), "--quiet"]) == 0
    ref = oracle(net.eval(), [0, 1, 2], "10", False, 1.0, variance=variance)
    diff = np.abs(np.load(out)["arr_0"].astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_options_the_flags_decide_are_refused(ckpt, tmp_path, capsys):
    flags = f"{MODEL_FLAGS} --noise_schedule cosine --timestep_respacing 4"
    for extra, needle in ((["--sampler", "ddim"], "--sampler"), (["--no-clip"], "--clip"), (["--steps", "5"], "--steps"), (["--disc", "karras"], "--disc")):
        code = main(["sample", "--guided-diffusion", str(ckpt), "--flags", flags, *extra, "--out", str(tmp_path / "x.npz")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "--flags" in err and len(err.strip().splitlines()) == 1, err
    code = main(["sample", "--guided-diffusion", str(ckpt), "--flags", f"{flags} --model_path other.pt", "--out", str(tmp_path / "x.npz")])
    assert code == 2 and "--model_path" in capsys.readouterr().err
    code = main(["sample", "--guided-diffusion", str(ckpt), "--flags", f"{flags} --classifier_scale 10", "--out", str(tmp_path / "x.npz")])
    assert code == 2 and "needs a classifier" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_a_preset_takes_its_lambda_from_the_flags_chain(ckpt, tmp_path, capsys, monkeypatch):
    import epsscale.presets as presets

    asked = []
    real = presets.get_preset
    monkeypatch.setattr(presets, "get_preset", lambda name, **kw: asked.append(kw["steps"]) or real(name, **kw))
    main(["sample", "--guided-diffusion", str(ckpt), "--preset", "adm-lsun-tower64", "--flags", "--timestep_respacing 100", "--out", str(tmp_path / "x.npz")])
    assert asked == [100]  # not --steps' default 20
    capsys.readouterr()
    for extra, needle in ((["--steps", "50"], "disagree"), (["--flags", "--use_ddim True"], "ancestral")):
        flags = ["--flags", "--timestep_respacing 100"] if extra[0] != "--flags" else []
        code = main(["sample", "--guided-diffusion", str(ckpt), "--preset", "adm-lsun-tower64", *flags, *extra, "--out", str(tmp_path / "x.npz")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, err


def test_classifier_flags_in_the_flags_guide_an_unconditional_model(ckpt, tmp_path):
    from epsscale.models.adm_classifier import create_adm_classifier

    cflags = "--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 16 --classifier_pool attention --classifier_use_scale_shift_norm True --classifier_resblock_updown True"
    torch.manual_seed(0)
    clf = create_adm_classifier({k: v for k, v in parse_flags(f"--image_size 32 {cflags}").items()})
    torch.save(clf.state_dict(), tmp_path / "clf.pt")
    base = f"{MODEL_FLAGS} --noise_schedule cosine --timestep_respacing 3 --num_samples 2 {cflags}"
    plain, guided = tmp_path / "plain.npz", tmp_path / "guided.npz"
    assert main(["sample", "--guided-diffusion", str(ckpt), "--flags", base, "--out", str(plain), "--quiet"]) == 0
    assert main(["sample", "--guided-diffusion", str(ckpt), "--flags", f"{base} --classifier_path {tmp_path / 'clf.pt'} --classifier_scale 10", "--out", str(guided), "--quiet"]) == 0
    g = np.load(guided)
    # classifier_sample.py: labels drawn for the classifier are saved with the images.
    assert g["arr_0"].shape == (2, 32, 32, 3) and g["arr_1"].shape == (2,) and "arr_1" not in np.load(plain).files
    assert not np.array_equal(g["arr_0"], np.load(plain)["arr_0"])
