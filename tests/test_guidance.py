"""Classifier-free guidance as a denoiser transform, and Epsilon Scaling after the mix."""

import pytest
import torch

from epsscale import Prediction, classifier_free, eps_scaling
from epsscale.adapters import as_prediction


class TwoClassDenoiser:
    """x0 = a_c * x for class c, and a fixed 'unconditional' gain when class_labels is None."""

    gains = {0: 0.3, 1: 0.7, None: 0.5}

    def __init__(self, with_var: bool = False) -> None:
        self.with_var = with_var
        self.seen = []

    def __call__(self, x, sigma, class_labels=None):
        self.seen.append(class_labels)
        x0 = self.gains[class_labels] * x
        if self.with_var:
            return Prediction(x0, torch.full_like(x, 0.25 if class_labels is not None else -0.75))
        return x0


def test_the_mix_is_linear_in_the_scale_and_ends_at_each_model():
    x = torch.randn(3, 2, dtype=torch.float64)
    s = torch.full((3,), 2.0, dtype=torch.float64)
    d = TwoClassDenoiser()
    for w, gain in ((0.0, 0.5), (1.0, 0.7), (3.0, 0.5 + 3 * 0.2)):
        out = classifier_free(d, w, {"class_labels": None})(x, s, class_labels=1)
        # u + w (c - u) against (0.5 + 0.2 w) x in float64: a few roundings of values up to
        # (1 + 2 w) |x| ~ 30, ~1e-14 at worst (measured 4e-16).
        torch.testing.assert_close(out, gain * x, rtol=1e-12, atol=1e-12)
    # The unconditional call overrides the condition; the conditional call keeps it.
    assert d.seen[-2:] == [1, None]


def test_es_after_the_mix_scales_the_guided_eps_and_keeps_the_conditional_variance():
    x = torch.randn(3, 2, dtype=torch.float64)
    s = torch.full((3,), 2.0, dtype=torch.float64)
    guided = classifier_free(TwoClassDenoiser(with_var=True), 4.0, {"class_labels": None})
    lam = 1.02
    plain = as_prediction(guided(x, s, class_labels=0))
    scaled = as_prediction(eps_scaling(guided, lam)(x, s, class_labels=0))
    eps = (x - plain.x0) / s[:, None]
    # The same formula in a different order: a few float64 roundings of values of size |x| (~1e-15).
    torch.testing.assert_close(scaled.x0, x - s[:, None] * eps / lam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scaled.var_interp, torch.full_like(x, 0.25))


@pytest.mark.parametrize(
    "scale,uncond,needle",
    [(float("nan"), {}, "scale"), (True, {}, "scale"), ("2", {}, "scale"), (2.0, None, "uncond"), (2.0, [("class_labels", None)], "uncond")],
)
def test_bad_arguments(scale, uncond, needle):
    with pytest.raises(ValueError, match=needle):
        classifier_free(TwoClassDenoiser(), scale, uncond)
