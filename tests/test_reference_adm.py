"""One ADM(-ES) ancestral step against golden tensors recorded from guided-diffusion / ADM-ES.

The fixtures hold x_t, the respaced index (9 = first step, 0 = last) of a cosine 1000-step
chain respaced with "10", and the reference mean, log-variance and pred_xstart with clipping on
and learned variance, for lambda = 1 and 1.017 (eps divided before x0 is predicted).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from epsscale import VPDenoiser, VPSchedule, eps_scaling
from epsscale.adapters import as_prediction
from epsscale.models import create_adm_model, load_adm_state_dict
from epsscale.samplers import ddpm_posterior

TINY = FIXTURES / "adm_tiny"


def _net(name):
    net = create_adm_model(json.loads((TINY / f"{name}.json").read_text()))
    load_adm_state_dict(net, load_file(str(TINY / f"{name}.safetensors")))
    return net.eval()


@pytest.mark.parametrize("name", ["tiny_uncond", "tiny_cond"])
@pytest.mark.parametrize("lam", ["1.0", "1.017"])
def test_ancestral_step_matches_adm_es(name, lam):
    ref = load_file(str(TINY / f"{name}_step_lam{lam}.safetensors"))
    net = _net(name)
    sch = VPSchedule("cosine")
    grid = sch.grid("10")
    den = eps_scaling(VPDenoiser(net, sch, learn_sigma=True), float(lam))
    cond = {}
    if name == "tiny_cond":
        cond = {"y": load_file(str(TINY / f"{name}_forward.safetensors"))["y"]}
    for b, r in enumerate(ref["respaced_index"].tolist()):
        i = 9 - r
        x_t = ref["x_t"][b : b + 1]
        x_ve = x_t.double() * (1 + grid[i] ** 2).sqrt()
        with torch.no_grad():
            pred = as_prediction(den(x_ve, grid[i].expand(1), **{k: v[b : b + 1] for k, v in cond.items()}))
        pred = pred.replace_x0(pred.x0.clamp(-1, 1))
        post = ddpm_posterior(pred, x_t, grid, i)
        # At the first step sigma ~ 2e4, and the reference's own float32 x0 = x_t/sqrt(abar) -
        # sigma eps cancels catastrophically: allow sigma * float32-eps there.
        atol = max(1e-5, float(grid[i]) * 2 ** -23 * 4)
        torch.testing.assert_close(post.pred_x0, ref["pred_xstart"][b : b + 1], rtol=1e-5, atol=atol)
        torch.testing.assert_close(post.mean, ref["mean"][b : b + 1], rtol=1e-5, atol=atol)
        torch.testing.assert_close(post.log_variance, ref["log_variance"][b : b + 1], rtol=1e-5, atol=1e-5)
