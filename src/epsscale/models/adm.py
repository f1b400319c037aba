"""The ADM UNet of guided-diffusion, written for epsscale.

This is the network of "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol, 2021),
the one that OpenAI's guided-diffusion calls ``UNetModel``, and that ADM-ES and DDPM-IP train.
It builds exactly the parameter names and shapes of guided-diffusion, so their checkpoints
(plain ``torch.save`` state dicts) load into it unchanged.

Three entry points:

- ``ADMUNet(**kwargs)``: the network, from explicit keyword arguments.
- ``create_adm_model(flags)``: the network from guided-diffusion's command-line flags
  (``--num_channels 192 --attention_resolutions 32,16,8 ...``, as a dict).
- ``load_adm_state_dict(model, state_dict)``: a strict load whose error lists every wrong key with
  its expected and actual shape.

What differs from guided-diffusion, on purpose:

- Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` on token-major
  ``[B, heads, T, ch]`` views (unit stride along ``ch``). Both of guided-diffusion's head layouts
  ("legacy": heads split before q/k/v; "new order": q/k/v split before heads) are reproduced by a
  reshape of the qkv projection, so the numbers agree with the einsum formula to float rounding.
- No gradient checkpointing (``use_checkpoint`` is accepted and ignored) and no fp16 torso
  conversion (``use_fp16`` is accepted; the model is built in float32). GroupNorm still computes in
  float32 whatever the activation dtype, as guided-diffusion's ``GroupNorm32`` does, so a model cast
  with ``.half()`` or run under ``torch.autocast`` behaves like the reference.
- Channels-last inputs and weights are supported; the attention block then reads its tokens
  without a copy.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn

from .adm_blocks import (
    NUM_CLASSES,
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    timestep_embedding,
    zeroed,
)

__all__ = [
    "ADMUNet",
    "ADM_FLAG_DEFAULTS",
    "create_adm_model",
    "default_channel_mult",
    "load_adm_state_dict",
    "timestep_embedding",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's channel multipliers by image size (32 from the ADM-ES/DDPM-IP forks)."""
    table: dict[int, tuple[float, ...]] = {
        32: (1, 2, 2, 2),
        64: (1, 2, 3, 4),
        128: (1, 1, 2, 3, 4),
        256: (1, 1, 2, 2, 4, 4),
        512: (0.5, 1, 1, 2, 2, 4, 4),
    }
    if image_size not in table:
        raise ValueError(
            f"no default channel_mult for image_size={image_size} (known: {sorted(table)}); "
            "pass channel_mult explicitly"
        )
    return table[image_size]


class ADMUNet(nn.Module):
    """The guided-diffusion ``UNetModel`` (ADM), parameter-for-parameter.

    Layout (``ds`` is the current downsampling rate, starting at 1):

    - ``time_embed``: Linear(C → 4C), SiLU, Linear(4C → 4C) on the sinusoidal embedding of t;
      ``label_emb`` (class-conditional models) adds a learnt class vector to it.
    - ``input_blocks``: a 3x3 conv, then per level ``num_res_blocks`` ResBlocks (each followed by
      attention when ``ds`` is an attention rate) and, except on the last level, a downsampler.
    - ``middle_block``: ResBlock, attention, ResBlock.
    - ``output_blocks``: per level in reverse, ``num_res_blocks + 1`` ResBlocks on the concatenation
      with the matching skip (with attention as above), and an upsampler at the end of each level
      but the first.
    - ``out``: GroupNorm, SiLU, zero-initialised 3x3 conv to ``out_channels``.

    Args:
        image_size: training resolution; fixes which levels get attention.
        in_channels: image channels.
        model_channels: base width C.
        out_channels: output channels (2 x in_channels when the variance is learnt).
        num_res_blocks: residual blocks per level in the encoder (one more in the decoder).
        attention_resolutions: feature-map resolutions that get attention, e.g. ``(16, 8)``; each
            becomes the rate ``image_size // res``. A resolution that no level reaches is ignored,
            as in guided-diffusion.
        dropout: dropout rate inside the residual blocks.
        channel_mult: width multiplier per level; ``None`` takes guided-diffusion's default for
            ``image_size``. Widths are ``int(mult * model_channels)``.
        num_classes: number of classes for a class-conditional model, else ``None``.
        num_heads: attention heads, used when ``num_head_channels == -1``.
        num_head_channels: fixed width per head; overrides ``num_heads`` (and
            ``num_heads_upsample``) when not -1.
        num_heads_upsample: heads in the decoder's attention blocks; -1 means ``num_heads``. The
            middle block always uses ``num_heads``.
        use_scale_shift_norm: AdaGN conditioning (scale and shift) instead of adding the embedding.
        resblock_updown: resample with residual blocks instead of conv/nearest layers.
        use_new_attention_order: read q/k/v before heads (``QKVAttention``) instead of the legacy
            heads-first layout (``QKVAttentionLegacy``).
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
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        channel_mult = tuple(
            default_channel_mult(image_size) if channel_mult is None else channel_mult
        )
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self._check_arguments(
            image_size, in_channels, model_channels, out_channels, num_res_blocks,
            attention_resolutions, dropout, channel_mult, num_classes,
        )  # fmt: skip
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        # The constructor arguments, so that ADMUNet(**model.config) rebuilds the same network.
        self.config: dict[str, object] = dict(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            num_classes=num_classes,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.channel_mult = channel_mult
        # guided-diffusion's UNetModel takes downsampling rates, its create_model resolutions.
        self.attention_ds = tuple(image_size // res for res in attention_resolutions)

        def res_block(ch: int, out_ch: int, *, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, time_embed_dim, dropout, out_ch,
                use_scale_shift_norm=use_scale_shift_norm, up=up, down=down,
            )  # fmt: skip

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        # Time and class embedding.
        time_embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # Encoder; skip_chans records the width of every skip, in order.
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_ds:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # Middle (its attention always uses num_heads, not num_heads_upsample).
        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch)
        )

        # Decoder.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [res_block(ch + skip_ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_ds:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, True)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # Output head (ch == input_ch here: the decoder ends at level 0's width).
        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            zeroed(nn.Conv2d(input_ch, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _check_arguments(
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        dropout: float,
        channel_mult: tuple[float, ...],
        num_classes: int | None,
    ) -> None:
        for name, value in (
            ("image_size", image_size),
            ("in_channels", in_channels),
            ("model_channels", model_channels),
            ("out_channels", out_channels),
            ("num_res_blocks", num_res_blocks),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not channel_mult or any(m <= 0 for m in channel_mult):
            raise ValueError(f"channel_mult must be positive multipliers, got {channel_mult}")
        if any(r < 1 or image_size % r for r in attention_resolutions):
            raise ValueError(
                f"attention_resolutions must divide image_size={image_size}, "
                f"got {attention_resolutions}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """Apply the network.

        Args:
            x: ``[N, in_channels, H, W]`` images (any memory format).
            timesteps: ``[N]`` timesteps (integer or float; fractional values are fine).
            y: ``[N]`` integer class labels; required exactly when the model is class-conditional.

        Returns:
            ``[N, out_channels, H, W]`` in ``x``'s dtype: ε, then (with learnt σ) the variance
            interpolation v.
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "pass y (class labels) if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}, y={'given' if y is not None else 'None'})"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(
                f"timesteps must have shape [{x.shape[0]}], got {list(timesteps.shape)}"
            )

        # Embedding of t (and y): [N, 4C].
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [{x.shape[0]}], got {list(y.shape)}")
            emb = emb + self.label_emb(y)

        # Encoder, keeping every block's output as a skip.
        h = x.to(self.input_blocks[0][0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)

        # Middle.
        h = self.middle_block(h, emb)

        # Decoder, consuming the skips in reverse.
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)

        # Output head.
        return self.out(h.to(self.out[2].weight.dtype)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# guided-diffusion flags.
# ---------------------------------------------------------------------------------------------

#: Model flags and their defaults, as ``scripts/image_sample.py`` has them
#: (``model_and_diffusion_defaults()``, plus ``learn_sigma`` and our ``in_channels``). These
#: defaults, not ``create_model``'s keyword defaults, apply to a flag that is left out, because
#: published checkpoints are described by command lines for ``image_sample.py``.
ADM_FLAG_DEFAULTS: Mapping[str, object] = MappingProxyType(
    dict(
        image_size=64,
        in_channels=3,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        learn_sigma=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
)

# Flags of guided-diffusion's scripts (and the ADM-ES / DDPM-IP forks) that do not shape the
# network. They are accepted and ignored so that a script's full flag set can be passed as is.
NON_MODEL_FLAGS = frozenset(
    {
        # diffusion_defaults()
        "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
        "rescale_timesteps", "rescale_learned_sigmas", "sigma_small",
        # ADM-ES / DDPM-IP
        "input_pertub", "eps_scaler", "forward_t",
        # sampling scripts
        "clip_denoised", "num_samples", "batch_size", "use_ddim", "model_path", "data_dir",
        "classifier_path", "classifier_scale", "classifier_use_fp16", "classifier_width",
        "classifier_depth", "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
        "classifier_resblock_updown", "classifier_pool",
    }
)  # fmt: skip

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def flag_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"flag {name!r}: expected a boolean (True/False, yes/no, 1/0), got {value!r}")


def flag_int(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"flag {name!r}: expected an integer, got {value!r}")


def flag_float(name: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"flag {name!r}: expected a number, got {value!r}")


def flag_list(name: str, value: object, parse: type[int] | type[float]) -> list:
    """A comma-separated string ("16,8") or a sequence of numbers; "" is the empty list."""
    items: Sequence[object]
    if isinstance(value, str):
        items = [s for s in (part.strip() for part in value.split(",")) if s]
    elif isinstance(value, Sequence):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        raise ValueError(f"flag {name!r}: expected comma-separated numbers, got {value!r}")
    to_number = flag_int if parse is int else flag_float
    try:
        return [to_number(name, item) for item in items]
    except ValueError:
        raise ValueError(
            f"flag {name!r}: expected comma-separated {parse.__name__}s, got {value!r}"
        ) from None


def create_adm_model(flags: Mapping[str, object]) -> ADMUNet:
    """Build an ``ADMUNet`` from guided-diffusion flags, as ``create_model`` would.

    Args:
        flags: flag names of guided-diffusion's ``image_sample.py`` (e.g. ``num_channels``,
            ``attention_resolutions="32,16,8"``, ``learn_sigma``, ``class_cond``, ``channel_mult``)
            with typed values or their command-line strings. Missing flags take
            ``ADM_FLAG_DEFAULTS``. Diffusion and sampling flags are ignored; ``use_fp16`` and
            ``use_checkpoint`` are accepted, and the model is built in float32 without
            checkpointing. The extra flag ``in_channels`` (default 3) sets the image channels.

    Returns:
        The network with freshly initialised weights, on the current default device (build it
        under ``with torch.device("meta"):`` to get shapes without allocating memory).

    Raises:
        ValueError: for an unknown flag or a value that does not parse, naming the flag.
    """
    for name in flags:
        if name not in ADM_FLAG_DEFAULTS and name not in NON_MODEL_FLAGS:
            close = difflib.get_close_matches(name, list(ADM_FLAG_DEFAULTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown ADM model flag {name!r}{hint}")
    f = {**ADM_FLAG_DEFAULTS, **flags}

    # Sizes.
    image_size = flag_int("image_size", f["image_size"])
    in_channels = flag_int("in_channels", f["in_channels"])
    learn_sigma = flag_bool("learn_sigma", f["learn_sigma"])
    mult_flag = f["channel_mult"]
    mults = [] if mult_flag is None else flag_list("channel_mult", mult_flag, float)
    if mults:
        channel_mult = tuple(int(m) if m.is_integer() else m for m in mults)
    else:  # "" (the default): guided-diffusion's choice for the image size
        try:
            channel_mult = default_channel_mult(image_size)
        except ValueError as err:
            raise ValueError(f"flag 'image_size': {err}") from None

    # Attention.
    attention_resolutions = tuple(
        flag_list("attention_resolutions", f["attention_resolutions"], int)
    )

    # Accepted, but without effect here.
    if flag_bool("use_fp16", f["use_fp16"]):
        logger.info("use_fp16 ignored: ADMUNet is built in float32 (cast it yourself if wanted)")
    flag_bool("use_checkpoint", f["use_checkpoint"])

    return ADMUNet(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=flag_int("num_channels", f["num_channels"]),
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=flag_int("num_res_blocks", f["num_res_blocks"]),
        attention_resolutions=attention_resolutions,
        dropout=flag_float("dropout", f["dropout"]),
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if flag_bool("class_cond", f["class_cond"]) else None,
        num_heads=flag_int("num_heads", f["num_heads"]),
        num_head_channels=flag_int("num_head_channels", f["num_head_channels"]),
        num_heads_upsample=flag_int("num_heads_upsample", f["num_heads_upsample"]),
        use_scale_shift_norm=flag_bool("use_scale_shift_norm", f["use_scale_shift_norm"]),
        resblock_updown=flag_bool("resblock_updown", f["resblock_updown"]),
        use_new_attention_order=flag_bool(
            "use_new_attention_order", f["use_new_attention_order"]
        ),
    )


# ---------------------------------------------------------------------------------------------
# Loading checkpoints.
# ---------------------------------------------------------------------------------------------

_MAX_LISTED = 5  # offending keys listed per kind in a load error


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def load_adm_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, assign: bool = False
) -> nn.Module:
    """Load a guided-diffusion state dict strictly, with a readable error.

    Every key must be present with its exact shape. On failure a ``ValueError`` lists the first few
    missing keys, unexpected keys and shape mismatches, one line each with the expected and actual
    shapes, plus a hint for the two usual causes (``learn_sigma``, ``class_cond``). A uniform
    ``module.`` prefix (a DistributedDataParallel state dict) is stripped.

    Args:
        model: the network, usually from ``create_adm_model`` with the checkpoint's flags.
        state_dict: parameter name → tensor, e.g. from ``torch.load`` or ``safetensors``.
        assign: assign the tensors instead of copying them (for a model built on the meta
            device; the parameters then take the checkpoint's dtype and device).

    Returns:
        ``model``, loaded.
    """
    expected = model.state_dict()
    loaded = dict(state_dict)
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    for key, value in loaded.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor "
                "(a training checkpoint? pass its model state dict)"
            )

    # Compare names and shapes.
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    mismatched = [
        k for k in expected if k in loaded and loaded[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"state dict does not fit {type(model).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} with the wrong shape"
        ]
        for kind, keys, describe in (
            ("missing key", missing, lambda k: f"expected {_shape(expected[k])}"),
            ("unexpected key", unexpected, lambda k: f"got {_shape(loaded[k])}"),
            (
                "wrong shape",
                mismatched,
                lambda k: f"expected {_shape(expected[k])}, got {_shape(loaded[k])}",
            ),
        ):
            lines += [f"  {kind} {k!r}: {describe(k)}" for k in keys[:_MAX_LISTED]]
            if len(keys) > _MAX_LISTED:
                lines.append(f"  ... and {len(keys) - _MAX_LISTED} more {kind}s")
        # Hints for the usual flag mistakes.
        if "out.2.weight" in mismatched:
            lines.append("  hint: the output width differs; check learn_sigma")
        if "label_emb.weight" in missing or "label_emb.weight" in unexpected:
            lines.append("  hint: label_emb differs; check class_cond")
        raise ValueError("\n".join(lines))

    model.load_state_dict(loaded, strict=True, assign=assign)
    return model
