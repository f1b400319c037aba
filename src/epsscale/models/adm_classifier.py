"""The noisy-image classifier of ADM-G, and classifier guidance as a sampler hook.

guided-diffusion (Dhariwal & Nichol 2021) guides its ImageNet samplers with a classifier trained
on noisy images: the half UNet it calls ``EncoderUNetModel``. :class:`EncoderUNet` rebuilds it
parameter for parameter (names and shapes of guided-diffusion's state dict), from the building
blocks of our ADM UNet, so OpenAI's ``*_classifier.pt`` checkpoints load into it with
:func:`epsscale.models.adm.load_adm_state_dict`.

:func:`classifier_guidance` turns a classifier into the ``classifier_grad`` hook of
:func:`epsscale.samplers.ddpm`: ``s * grad_x log p(y | x_t, t)`` at the original timestep t,
which is guided-diffusion's ``cond_fn``. The sampler adds ``variance * grad`` to the ancestral
mean (ADM-G, Algorithm 1). Epsilon Scaling acts on the diffusion model's eps only and never
reaches this gradient.

As for :class:`~epsscale.models.adm.ADMUNet`: attention runs through SDPA, there is no gradient
checkpointing and no fp16 torso (``classifier_use_fp16`` is accepted and ignored).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsscale.checks import check_number
from epsscale.models.adm import (
    ADM_FLAG_DEFAULTS,
    NON_MODEL_FLAGS,
    default_channel_mult,
    flag_bool,
    flag_int,
    flag_list,
)
from epsscale.models.adm_blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    timestep_embedding,
    zeroed,
)
from epsscale.schedules import VPSchedule

__all__ = [
    "AttentionPool2d",
    "CLASSIFIER_FLAG_DEFAULTS",
    "ClassifierGuidance",
    "EncoderUNet",
    "classifier_guidance",
    "create_adm_classifier",
]

Pool = Literal["adaptive", "attention", "spatial", "spatial_v2"]
_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
NUM_CLASSES = 1000
_HEAD_CHANNELS = 64  # create_classifier fixes num_head_channels=64


# ---------------------------------------------------------------------------------------------
# Attention pooling (the CLIP head, as guided-diffusion adapted it).
# ---------------------------------------------------------------------------------------------


class AttentionPool2d(nn.Module):
    """Pool a feature map into one vector with a single attention query (CLIP's ``AttentionPool2d``).

    The tokens are the mean over all positions followed by every position, each plus a learnt
    positional embedding; ``qkv_proj`` projects them and heads of ``head_channels`` attend in the
    "new order" layout (q, k, v split before heads: guided-diffusion's ``QKVAttention``). Only the
    mean token's output is kept, projected by ``c_proj`` to ``output_dim``. Since no other token's
    output is used, only the mean token's query is computed.

    Parameters: ``positional_embedding`` ``[C, S² + 1]``, ``qkv_proj`` (1x1 Conv1d, ``[3C, C, 1]``),
    ``c_proj`` (1x1 Conv1d, ``[output_dim, C, 1]``).
    """

    def __init__(self, spatial_dim: int, embed_dim: int, head_channels: int, output_dim: int | None = None) -> None:
        super().__init__()
        if head_channels < 1 or embed_dim % head_channels:
            raise ValueError(f"attention pooling over {embed_dim} channels needs head_channels dividing it, got {head_channels}")
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // head_channels

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        if height * width + 1 != self.positional_embedding.shape[1]:
            raise ValueError(
                f"attention pooling was built for {self.spatial_dim}x{self.spatial_dim} feature maps, got {height}x{width}"
            )
        heads, ch = self.num_heads, c // self.num_heads

        # Tokens: the mean, then every position, plus the positional embedding: [B, T+1, C].
        tokens = x.flatten(2)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = (tokens + self.positional_embedding[None].to(tokens.dtype)).transpose(1, 2)

        # q from the mean token only; k, v from all tokens; q/k/v split before heads.
        w, bias = self.qkv_proj.weight[:, :, 0], self.qkv_proj.bias
        q = F.linear(tokens[:, :1], w[:c], bias[:c])  # [B, 1, C]
        kv = F.linear(tokens, w[c:], bias[c:])  # [B, T+1, 2C]
        q = q.view(b, 1, heads, ch).transpose(1, 2)  # [B, heads, 1, ch]
        k, v = kv.view(b, -1, 2, heads, ch).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T+1, ch]

        # Attend, concatenate heads (head-major) and project: [B, output_dim].
        a = F.scaled_dot_product_attention(q, k, v).reshape(b, c)
        return F.linear(a, self.c_proj.weight[:, :, 0], self.c_proj.bias)


# ---------------------------------------------------------------------------------------------
# The classifier.
# ---------------------------------------------------------------------------------------------


class EncoderUNet(nn.Module):
    """guided-diffusion's ``EncoderUNetModel``: the encoder half of ADM plus a pooling head.

    ``time_embed``, ``input_blocks`` and ``middle_block`` are laid out exactly as in
    :class:`~epsscale.models.adm.ADMUNet` (without class embedding); ``out`` is the head:

    - ``"attention"`` (the released classifiers): GroupNorm, SiLU, :class:`AttentionPool2d`;
    - ``"adaptive"``: GroupNorm, SiLU, global average pool, zero-initialised 1x1 conv, flatten;
    - ``"spatial"`` / ``"spatial_v2"``: an MLP on the spatial means of every block's output.

    Args:
        image_size: training resolution (sets the attention levels and the pooling grid).
        in_channels: image channels.
        model_channels: base width C (``classifier_width``).
        out_channels: number of classes.
        num_res_blocks: residual blocks per level (``classifier_depth``).
        attention_resolutions: feature-map resolutions with attention, e.g. ``(32, 16, 8)``
            (guided-diffusion's constructor takes the rates ``image_size // res``).
        dropout: dropout inside the residual blocks.
        channel_mult: width multiplier per level; ``None`` takes the default for ``image_size``.
        num_heads: attention heads when ``num_head_channels == -1``.
        num_head_channels: width per head; required (not -1) for ``pool="attention"``.
        use_scale_shift_norm: AdaGN conditioning on the time embedding.
        resblock_updown: downsample with residual blocks.
        use_new_attention_order: q/k/v layout of the torso's attention blocks (the pooling head
            always uses the new order, as guided-diffusion does).
        pool: the head, see above.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int = 3,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: Pool = "adaptive",
    ) -> None:
        super().__init__()
        channel_mult = tuple(default_channel_mult(image_size) if channel_mult is None else channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        for name, value in (("image_size", image_size), ("in_channels", in_channels), ("model_channels", model_channels),
                            ("out_channels", out_channels), ("num_res_blocks", num_res_blocks)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not channel_mult or any(m <= 0 for m in channel_mult):
            raise ValueError(f"channel_mult must be positive multipliers, got {channel_mult}")
        if any(r < 1 or image_size % r for r in attention_resolutions):
            raise ValueError(f"attention_resolutions must divide image_size={image_size}, got {attention_resolutions}")
        if pool not in _POOLS:
            raise ValueError(f"unknown pool {pool!r}: expected one of {', '.join(_POOLS)}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (guided-diffusion's classifiers use 64)")

        self.config: dict[str, object] = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            num_heads=num_heads, num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order, pool=pool,
        )  # fmt: skip
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.pool = pool
        self.attention_ds = tuple(image_size // res for res in attention_resolutions)
        time_embed_dim = 4 * model_channels

        def res_block(ch: int, out_ch: int, *, down: bool = False) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_ch, use_scale_shift_norm=use_scale_shift_norm, down=down)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)  # fmt: skip

        # Time embedding.
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        # Encoder (as ADMUNet's); feature_size sums the widths the spatial heads read.
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        feature_size = ch
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                feature_size += ch
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                feature_size += ch
                ds *= 2

        # Middle.
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))
        feature_size += ch

        # Head.
        if pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zeroed(nn.Conv2d(ch, out_channels, 1)), nn.Flatten(),
            )  # fmt: skip
        elif pool == "attention":
            if image_size % ds:
                raise ValueError(f"image_size={image_size} is not divisible by the final downsampling rate {ds}")
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), GroupNorm32(2048), nn.SiLU(), nn.Linear(2048, out_channels)
            )

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Class logits ``[N, out_channels]`` for noisy images ``x`` ``[N, C, H, W]`` at ``timesteps`` ``[N]``."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {list(timesteps.shape)}")

        # Time embedding: [N, 4C].
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))

        # Encoder and middle; the spatial heads keep every block's spatial mean.
        spatial = self.pool.startswith("spatial")
        means: list[Tensor] = []
        h = x.to(self.input_blocks[0][0].weight.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)

        # Head.
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# guided-diffusion flags.
# ---------------------------------------------------------------------------------------------

#: ``classifier_defaults()`` of guided-diffusion's ``script_util.py``.
CLASSIFIER_FLAG_DEFAULTS: Mapping[str, object] = MappingProxyType(
    dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )
)

# Flags of classifier_sample.py that do not shape the classifier: accepted and ignored, so that a
# script's full flag set can be passed as is.
_IGNORED = frozenset(ADM_FLAG_DEFAULTS) | NON_MODEL_FLAGS


def create_adm_classifier(flags: Mapping[str, object]) -> EncoderUNet:
    """Build an :class:`EncoderUNet` from guided-diffusion classifier flags (``create_classifier``).

    Args:
        flags: ``image_size`` and the ``classifier_*`` flags of ``classifier_sample.py``, typed or as
            command-line strings; missing ones take :data:`CLASSIFIER_FLAG_DEFAULTS`. The
            diffusion model's and the sampling flags are accepted and ignored (except
            ``image_size``, which both share). As in guided-diffusion: 1000 classes, 3 input
            channels, 64 channels per attention head, no dropout, the default channel
            multipliers for ``image_size``. ``classifier_use_fp16`` is accepted; the model is
            float32.

    Returns:
        The classifier with fresh weights on the current default device (use
        ``with torch.device("meta"):`` for shapes only).

    Raises:
        ValueError: for an unknown flag or a value that does not parse, naming the flag.

    The ImageNet 128x128 classifier of ADM-G: ``{"image_size": 128, "classifier_width": 128,
    "classifier_depth": 2, "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True, "classifier_resblock_updown": True,
    "classifier_pool": "attention"}``.
    """
    for name in flags:
        if name not in CLASSIFIER_FLAG_DEFAULTS and name not in _IGNORED:
            close = difflib.get_close_matches(name, list(CLASSIFIER_FLAG_DEFAULTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown ADM classifier flag {name!r}{hint}")
    f = {**CLASSIFIER_FLAG_DEFAULTS, **{k: v for k, v in flags.items() if k in CLASSIFIER_FLAG_DEFAULTS}}

    image_size = flag_int("image_size", f["image_size"])
    try:
        channel_mult = default_channel_mult(image_size)
    except ValueError as err:
        raise ValueError(f"flag 'image_size': {err}") from None
    pool = f["classifier_pool"]
    if pool not in _POOLS:
        raise ValueError(f"flag 'classifier_pool': expected one of {', '.join(_POOLS)}, got {pool!r}")
    flag_bool("classifier_use_fp16", f["classifier_use_fp16"])

    return EncoderUNet(
        image_size=image_size,
        in_channels=3,
        model_channels=flag_int("classifier_width", f["classifier_width"]),
        out_channels=NUM_CLASSES,
        num_res_blocks=flag_int("classifier_depth", f["classifier_depth"]),
        attention_resolutions=flag_list("classifier_attention_resolutions", f["classifier_attention_resolutions"], int),
        channel_mult=channel_mult,
        num_head_channels=_HEAD_CHANNELS,
        use_scale_shift_norm=flag_bool("classifier_use_scale_shift_norm", f["classifier_use_scale_shift_norm"]),
        resblock_updown=flag_bool("classifier_resblock_updown", f["classifier_resblock_updown"]),
        pool=pool,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------
# Classifier guidance (ADM-G).
# ---------------------------------------------------------------------------------------------


class ClassifierGuidance:
    """``s * grad_x log softmax(classifier(x_t, t))[y]``: guided-diffusion's ``cond_fn``.

    Called by :func:`epsscale.samplers.ddpm` as ``guide(x_vp, sigma, **cond)`` with the VP state
    x_t and the per-sample sigma; the classifier sees x_t at the *original* timestep
    ``t = schedule.timestep(sigma)`` of the 1000-step chain (guided-diffusion's respacing wrapper
    maps respaced indices back to these). ``cond`` must hold the labels ``y`` ``[N]``; other keys
    are ignored. Returns a gradient shaped like x_t in its dtype.
    """

    def __init__(self, classifier: Callable[[Tensor, Tensor], Tensor], schedule: VPSchedule, scale: float) -> None:
        check_number(scale, "classifier guidance scale")
        if not isinstance(schedule, VPSchedule):
            raise ValueError(f"schedule must be the diffusion model's VPSchedule, got {type(schedule).__name__}")
        self.classifier = classifier
        self.schedule = schedule
        self.scale = float(scale)

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None, **_: Any) -> Tensor:
        if y is None:
            raise ValueError("classifier guidance needs the class labels: pass cond={'y': labels}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = self.schedule.timestep(sigma.cpu()).to(x.device)
        y = torch.as_tensor(y, device=x.device).reshape(-1)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must hold one label per sample ({x.shape[0]}), got shape {list(y.shape)}")

        # grad_x log p(y | x_t, t), times the guidance scale, with x_t in the classifier's dtype.
        param = next(self.classifier.parameters(), None) if isinstance(self.classifier, nn.Module) else None
        dtype = param.dtype if param is not None and param.is_floating_point() else x.dtype
        with torch.enable_grad():
            x_in = x.detach().to(dtype).requires_grad_(True)
            logits = self.classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[torch.arange(len(y), device=x.device), y]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad.to(x.dtype) * self.scale


def classifier_guidance(classifier: Callable[[Tensor, Tensor], Tensor], schedule: VPSchedule, scale: float) -> ClassifierGuidance:
    """The ``classifier_grad`` hook of :func:`epsscale.samplers.ddpm` for a noisy-image classifier.

    ``ddpm(eps_scaling(denoiser, lam), x, sigmas, cond={"y": labels},
    classifier_grad=classifier_guidance(clf, schedule, 0.5))`` samples like ADM-G's
    ``classifier_sample.py`` with ``--classifier_scale 0.5``, with Epsilon Scaling on the model's
    eps only (never on this gradient).
    """
    return ClassifierGuidance(classifier, schedule, scale)
