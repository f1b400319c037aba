"""A newcomer's run through the README: every command block runs, scaled down, and succeeds.

Each ```bash block is split into commands. ``make`` targets are checked to exist (they set up and
run the long jobs), ``source .venv/bin/activate`` is what makes ``epsscale`` callable, and every
other command runs: ``epsscale ...`` in-process through ``epsscale.cli.main``; ``torchrun``,
``python scripts/...`` and ``python benchmarks/...`` as subprocesses. Each ```python block is
executed. Before running, each command is scaled down (fewer seeds, steps and samples) and the
files a user would download (checkpoints, pickles, hub pipelines) are replaced by tiny stand-ins
with the same format, made here. Anything the README runs that this test cannot map fails the test,
so a new README example needs a line here.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("EPSSCALE_README", ROOT / "README.md"))
needs_fmnist_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")

GAUSS_MODULE = '''
import torch


class GaussNet:
    """A duck-typed EDM net (the exact denoiser of N(0, 0.5^2) data), class-conditional, 3x8x8."""

    sigma_min, sigma_max = 0.0, float("inf")
    img_channels, img_resolution, label_dim = 3, 8, 10

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (0.25 / (0.25 + s**2)) * x.to(torch.float64)
'''

# The architecture flags of the README's guided-diffusion examples, and tiny ones with the same
# format (the diffusion flags, lambda and respacing are kept).
TINY_ADM = "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_head_channels 16 --attention_resolutions 16 --resblock_updown True --use_new_attention_order True --learn_sigma True --dropout 0.0 --use_scale_shift_norm True"
TINY_CLASSIFIER = "--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 16 --classifier_pool attention --classifier_use_scale_shift_norm True --classifier_resblock_updown True"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), re.S)


def commands(block: str) -> list[str]:
    """Logical command lines: continuations joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        text = " ".join(shlex.split(cur, comments=True)) if cur.strip() and not cur.lstrip().startswith("#") else ""
        if text:
            out.append(cur.split(" #")[0].strip() if "#" in cur and not cur.lstrip().startswith("#") else cur.strip())
        cur = ""
    return out


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """Tiny files with the formats of the ones the README's examples name."""
    from safetensors.torch import load_file

    from epsscale.integrations.guided_diffusion import parse_flags
    from epsscale.models.adm import create_adm_model
    from epsscale.models.adm_classifier import create_adm_classifier

    d = tmp_path_factory.mktemp("stand_ins")
    torch.manual_seed(0)
    uncond = load_file(str(ROOT / "tests" / "fixtures" / "adm_tiny" / "tiny_uncond.safetensors"))
    torch.save(uncond, d / "adm_uncond.pt")
    cond = create_adm_model(parse_flags(f"{TINY_ADM} --class_cond True"))
    torch.save(cond.state_dict(), d / "adm_cond.pt")
    clf = create_adm_classifier(parse_flags(f"--image_size 32 {TINY_CLASSIFIER}"))
    torch.save(clf.state_dict(), d / "clf.pt")
    (d / "edm").mkdir()
    (d / "edm" / "gaussnet.py").write_text(GAUSS_MODULE)
    sys.path.insert(0, str(d / "edm"))
    import gaussnet  # noqa: E402

    (d / "edm.pkl").write_bytes(pickle.dumps({"ema": gaussnet.GaussNet()}))
    # diffusers pipelines: a DDIM pipeline and a DiT pipeline, saved.
    from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(d / "ddim_pipe")
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                        sample_size=4, patch_size=2, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(d / "dit_pipe")
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(d / "images.npz", arr_0=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    return {k: str(v) for k, v in {"dir": d, "adm_uncond": d / "adm_uncond.pt", "adm_cond": d / "adm_cond.pt", "clf": d / "clf.pt", "edm_dir": d / "edm", "edm": d / "edm.pkl",
                                    "ddim_pipe": d / "ddim_pipe", "dit_pipe": d / "dit_pipe", "images": d / "images.npz"}.items()}


def scale_down(cmd: str, s: dict[str, str]) -> str:
    """The README's command at toy size, on the stand-ins."""
    subs = [
        # Downloads -> stand-ins with the same format.
        (r"--guided-diffusion \S*(cifar10|uncond|256x256_diffusion_uncond)\S*\.pt", f"--guided-diffusion {s['adm_uncond']}"),
        (r"--guided-diffusion \S*128x128_diffusion\S*\.pt", f"--guided-diffusion {s['adm_cond']}"),
        (r"--classifier \S+\.pt", f"--classifier {s['clf']}"),
        (r"--edm \S+\.pkl", f"--edm {s['edm']}"),
        (r"PYTHONPATH=\S+ ", ""),
        (r"--diffusers \S*ddim\S*", f"--diffusers {s['ddim_pipe']}"),
        (r"--diffusers \S+", f"--diffusers {s['dit_pipe']}"),
        (r"--data \S+", f"--data {s['images']}"),
        # The paper's ADM architecture flags -> a tiny architecture in the same format.
        (r"--image_size 32 --num_channels 128 .*? --use_scale_shift_norm True", TINY_ADM),
        (r"(--preset adm-\S+)", rf'\1 --flags "{TINY_ADM} --num_head_channels 16 {TINY_CLASSIFIER}"'),
        # Sizes.
        (r"--seeds \d+-\d+", "--seeds 0-3"),
        (r"--num \d+", "--num 8"),
        (r"--fid-num \d+", "--fid-num 8"),
        (r"--points \d+", "--points 3"),
        (r"--batch \d+", "--batch 4"),
        (r"--nproc_per_node \d+", "--nproc_per_node 2"),
        (r"--timestep_respacing (\d+)", "--timestep_respacing 3"),
        (r"--batch_size \d+", "--batch_size 4"),
        (r"(--num_samples) \d+", r"\1 4"),
    ]
    for pat, rep in subs:
        cmd = re.sub(pat, rep, cmd)
    if re.search(r"\bepsscale sample\b", cmd) and "--seeds" not in cmd:  # guided-diffusion's default is 10,000 samples
        cmd += " --seeds 0-3"
    if cmd.startswith("epsscale train") or " train " in cmd:
        cmd = re.sub(r"--steps \d+", "--steps 2 --batch 2", cmd)
    elif "--preset" not in cmd:
        cmd = re.sub(r"--steps (\d+)", "--steps 3", cmd)
    if "--guided-diffusion" in cmd and "--preset adm-cifar10" in cmd:
        cmd = cmd.replace("--steps 100", "--steps 20")
    return cmd


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_epsscale(argv: list[str], cwd: Path) -> tuple[int, str]:
    from epsscale.cli import main

    err = io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(argv)
            except SystemExit as e:  # --help and --version exit through argparse
                code = int(e.code or 0)
    finally:
        os.chdir(old)
    return code, err.getvalue()


@needs_fmnist_data
def test_every_bash_block_runs(stand_ins, tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    work = tmp_path / "work"
    work.mkdir()
    ran = []
    for block in blocks("bash"):
        for raw in commands(block):
            cmd = scale_down(raw, stand_ins)
            words = shlex.split(cmd)
            if words[0] == "make":
                assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), f"README names make {words[1]}, which the Makefile lacks"
                continue
            if words[:2] == ["source", ".venv/bin/activate"]:
                assert (ROOT / ".venv" / "bin" / "activate").exists() or "VIRTUAL_ENV" not in os.environ
                continue
            env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{stand_ins['edm_dir']}", "OMP_NUM_THREADS": "1"}
            for w in words[1:]:  # inputs the README names by their place in the repository: copied, never written there
                src = ROOT / w
                if not w.startswith("-") and not w.startswith(("scripts/", "benchmarks/")) and src.is_file() and not (work / w).exists():
                    (work / w).parent.mkdir(parents=True, exist_ok=True)
                    (work / w).write_bytes(src.read_bytes())
            if words[0] == "epsscale":
                sys.path.insert(0, stand_ins["edm_dir"])
                code, err = run_epsscale(words[1:], work)
                assert code == 0, f"{raw}\n-> {cmd}\n{err}"
            elif words[0] in ("torchrun", "python", "python3"):
                exe = [str(Path(sys.executable).with_name("torchrun"))] if words[0] == "torchrun" else [sys.executable]
                args = [str(ROOT / w) if w.startswith(("scripts/", "benchmarks/")) else w for w in words[1:]]
                if words[0] == "torchrun":
                    args = ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
                p = subprocess.run([*exe, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
                assert p.returncode == 0, f"{raw}\n-> {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
            else:
                raise AssertionError(f"the README runs {words[0]!r}, which this test does not know how to run: {raw}")
            ran.append(raw)
    assert ran, "no commands found in the README"


def test_every_python_block_runs(stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks("python")):
        code = block
        code = code.replace('"facebook/DiT-XL-2-256"', repr(stand_ins["dit_pipe"]))
        code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)
        code = code.replace("class_labels=[207]", "class_labels=[3]")
        code = code.replace("range(1000)", "range(64)").replace("(1000, 2)", "(64, 2)")
        code = code.replace("net = ...", "net = __import__('gaussnet').GaussNet()")
        code = code.replace("(64, 3, 32, 32)", "(64, 3, 8, 8)")
        sys.path.insert(0, stand_ins["edm_dir"])
        namespace: dict = {}
        if "flow_pipe" in code:
            from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

            unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
            namespace["flow_pipe"] = DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, f"README python block {i + 1}", "exec"), namespace)
