"""The building blocks of ADM's UNet and classifier (guided-diffusion's ``unet.py``), written for epsscale.

GroupNorm in float32, the sinusoidal timestep embedding, up/down-sampling, the residual block with
(optional) scale-shift norm, and self-attention through ``scaled_dot_product_attention`` in both
of guided-diffusion's head layouts. Parameter names and shapes are guided-diffusion's, so its
checkpoints load unchanged (:mod:`epsscale.models.adm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupNorm32", "timestep_embedding", "zeroed", "Upsample", "Downsample", "ResBlock", "AttentionBlock", "TimestepEmbedSequential", "NUM_CLASSES"]

NUM_CLASSES = 1000  # class_cond=True means ImageNet's 1000 classes in guided-diffusion
_NORM_GROUPS = 32  # every GroupNorm in ADM has 32 groups


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups that always computes in float32 and returns the input dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(_NORM_GROUPS, channels)

    def forward(self, x: Tensor) -> Tensor:
        # Parameters too in float32, so that a .half() model works like the reference.
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in guided-diffusion.

    ``emb[n] = [cos(t_n f_0), ..., cos(t_n f_{h-1}), sin(t_n f_0), ..., sin(t_n f_{h-1})]`` with
    ``h = dim // 2`` and ``f_i = max_period^(-i/h)``; a zero column is appended when ``dim`` is odd.
    Cosines come first (the transformer paper puts sines first).

    Args:
        timesteps: ``[N]`` tensor of timesteps, any numeric dtype (cast to float32).
        dim: width of the embedding.
        max_period: the longest period, which sets the lowest frequency.

    Returns:
        ``[N, dim]`` float32 tensor.
    """
    half = dim // 2
    # The frequencies are computed on the CPU in float32 and then moved, exactly as the reference
    # does, in its order: (-log P * i) / h, not -log P * (i / h), which rounds differently for
    # some widths (192: up to 3e-5). At t ~ 1000 one ulp in a frequency moves the phase by ~6e-5.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]  # [N, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zeroed(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM's residual output layers start as the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution, or 2x2 average pooling (key ``op``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.channels = channels
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """ADM residual block, conditioned on the time (and class) embedding.

    ``h = conv(SiLU(GN(x)))``; then either ``h = h + Linear(SiLU(emb))`` followed by
    ``conv(Dropout(SiLU(GN(h))))``, or with ``use_scale_shift_norm`` the AdaGN of the ADM paper
    (section 3): ``GN(h)·(1 + scale) + shift`` before the same ``SiLU → Dropout → conv``. The output
    is ``skip(x) + h``. With ``up``/``down`` the block resamples both branches: the main branch
    between its first activation and its first convolution, the skip branch at its input.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        *,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.channels = channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = use_scale_shift_norm

        # Key layout: in_layers.{0: norm, 1: SiLU, 2: conv}.
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        # Key layout: emb_layers.{0: SiLU, 1: linear}; twice as wide for (scale, shift).
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))

        # Key layout: out_layers.{0: norm, 1: SiLU, 2: dropout, 3: zero-initialised conv}.
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )

        # guided-diffusion never sets use_conv for the skip: a 1x1 conv when the width changes.
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Input layers, resampling between the activation and the convolution.
        in_norm, in_act, in_conv = self.in_layers
        h = in_conv(self.h_upd(in_act(in_norm(x))))
        x = self.x_upd(x)

        # Inject the embedding: [N, C'] -> [N, C', 1, 1].
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            out_norm, out_act, out_drop, out_conv = self.out_layers
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_conv(out_drop(out_act(h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    The parameters are guided-diffusion's: ``norm``, a 1x1 ``Conv1d`` ``qkv`` (``[3C, C, 1]``) and a
    zero-initialised 1x1 ``Conv1d`` ``proj_out``. The 3C projected channels are read in one of two
    layouts, which must match the checkpoint:

    - legacy (``QKVAttentionLegacy``, ``use_new_attention_order=False``): per head, then q/k/v,
      channel ``= head·3ch + {0,1,2}·ch + c``;
    - new order (``QKVAttention``): per q/k/v, then head, channel ``= {0,1,2}·C + head·ch + c``.

    Either way the attention is ``softmax(q·kᵀ/√ch)·v`` per head, and the head outputs are
    concatenated head-major before ``proj_out``.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(
                    f"attention over {channels} channels needs num_heads dividing it, "
                    f"got num_heads={num_heads}"
                )
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"attention over {channels} channels needs num_head_channels dividing it, "
                    f"got num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.channels = channels
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        t, heads = height * width, self.num_heads
        ch = c // heads

        # Project every position to q, k, v. For a channels-last x the token view is free.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, T, C]
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # [B, T, 3C]

        # Split into heads in the checkpoint's layout. q, k and v are views with unit stride
        # along ch, which is what SDPA needs to be fast: measured on this CPU, views taken from
        # the channel-major [B, 3C, T] layout (stride T along ch) run 3.6x slower, and a
        # .contiguous() copy of these views costs 10-20% without helping.
        if self.use_new_attention_order:
            qkv = qkv.view(b, t, 3, heads, ch).permute(2, 0, 3, 1, 4)
        else:
            qkv = qkv.view(b, t, heads, 3, ch).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, T, ch], stride 1 along ch

        # Attend: softmax(q kᵀ / √ch) v.
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, ch]

        # Concatenate heads (head-major channels), project, and add the residual.
        a = a.transpose(1, 2).reshape(b, t, c)  # [B, T, C]
        out = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)  # [B, T, C]
        return x + out.view(b, height, width, c).permute(0, 3, 1, 2)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; the residual blocks among them also receive the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
