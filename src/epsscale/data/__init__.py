"""Data: Fashion-MNIST (Debian's dataset-fashion-mnist), image files, and 2-D toy mixtures."""

from .toy import GaussianMixture, ImperfectDenoiser, default_mixture

__all__ = ["GaussianMixture", "ImperfectDenoiser", "default_mixture"]
