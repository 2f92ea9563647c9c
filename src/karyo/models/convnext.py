"""ConvNeXt backbone (Liu et al., "A ConvNet for the 2020s", CVPR 2022), written in the project.

The prompter of PromptNucSeg (supplementary §A) uses ConvNeXt-S as its image encoder. This module is the
backbone only: stem (4×4 conv, stride 4 + channels-first LayerNorm), four stages of blocks
(7×7 depthwise conv → LayerNorm → Linear 4× → GELU → Linear → layer scale γ → drop path + residual, paper
Fig. 4) and three downsampling layers (LayerNorm + 2×2 conv, stride 2). The forward pass returns the four
stage outputs at strides 4, 8, 16 and 32, channels-first; the classifier (``norm``/``head``) is left out.

Parameter names follow the official facebookresearch/ConvNeXt layout so that official checkpoints load
unchanged; :func:`load_convnext_weights` also maps the timm layout (see :func:`convert_timm_state_dict`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from karyo.config import check_fields
from karyo.errors import InputError
from karyo.models.layers import DropPath, LayerNorm2d

#: (depths, dims) of the named sizes: tiny/small/base are the paper's ConvNeXt-T/S/B; atto…nano are the small
#: variants timm defines (same block, fewer/narrower stages).
CONVNEXT_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}

#: Output stride of each of the four stages.
STAGE_STRIDES: tuple[int, int, int, int] = (4, 8, 16, 32)


@dataclass
class ConvNeXtConfig:
    """Sizes of a ConvNeXt; ``ConvNeXtConfig.preset("small")`` gives ConvNeXt-S.

    ``layer_scale_init`` is the initial value of the per-channel layer scale γ (1e-6 as in the paper);
    ``<= 0`` disables layer scale (no ``gamma`` parameters). ``drop_path_rate`` is the stochastic-depth
    rate of the last block, increased linearly from 0 over all blocks as in the official code.
    """

    depths: tuple[int, ...] = (2, 2, 6, 2)
    dims: tuple[int, ...] = (40, 80, 160, 320)
    in_chans: int = 3
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.dims = tuple(int(d) for d in self.dims)
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise InputError(None, f"ConvNeXt needs 4 depths and 4 dims, got {self.depths} and {self.dims}")
        if min(self.depths) < 1 or min(self.dims) < 1:
            raise InputError(None, f"ConvNeXt depths/dims must be positive, got {self.depths} and {self.dims}")
        if int(self.in_chans) < 1:
            raise InputError(None, f"in_chans must be >= 1, got {self.in_chans}")
        if not 0.0 <= float(self.drop_path_rate) < 1.0:
            raise InputError(None, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @classmethod
    def preset(cls, name: str, **overrides) -> ConvNeXtConfig:
        """The named size (``atto``, ``femto``, ``pico``, ``nano``, ``tiny``, ``small``, ``base``)."""
        if name not in CONVNEXT_PRESETS:
            raise InputError(None, f"unknown ConvNeXt preset {name!r}; known: {sorted(CONVNEXT_PRESETS)}")
        depths, dims = CONVNEXT_PRESETS[name]
        check_fields(cls, overrides)
        return dataclasses.replace(cls(depths=depths, dims=dims), **overrides)


class Block(nn.Module):
    """One ConvNeXt block (paper Fig. 4): dwconv 7×7 → LN → Linear 4C → GELU → Linear C → γ → drop path + x."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init))) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # N, H, W, C: the Linear layers act on channels
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor: ``forward(x)`` → the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, config: ConvNeXtConfig | None = None):
        super().__init__()
        cfg = config if config is not None else ConvNeXtConfig()
        self.config = cfg
        dims, depths = cfg.dims, cfg.depths
        self.out_channels: tuple[int, ...] = tuple(dims)
        self.strides: tuple[int, ...] = STAGE_STRIDES
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(cfg.in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0])))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = torch.linspace(0, cfg.drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(dims[i], drop_path=rates[start + j], layer_scale_init=cfg.layer_scale_init)
                for j in range(depths[i])]))
            start += depths[i]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise InputError(None, f"ConvNeXt expects B×{self.config.in_chans}×H×W input, got {tuple(x.shape)}")
        features = []
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
            features.append(x)
        return features


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for convs and linears, as in the official code."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightLoadReport:
    """What :func:`load_convnext_weights` did: the source layout, dropped keys and channel-adapted keys."""

    layout: str
    ignored: tuple[str, ...]
    adapted: tuple[str, ...]


_TIMM_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^stem\.0\.(weight|bias)$", r"downsample_layers.0.0.\1"),
    (r"^stem\.1\.(weight|bias)$", r"downsample_layers.0.1.\1"),
    (r"^stages\.([1-3])\.downsample\.([01])\.(weight|bias)$", r"downsample_layers.\1.\2.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)$", r"stages.\1.\2.dwconv.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)$", r"stages.\1.\2.norm.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"stages.\1.\2.pwconv1.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"stages.\1.\2.pwconv2.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
))
_OFFICIAL_IGNORED = ("norm.", "head.")
_TIMM_IGNORED = ("head.", "norm_pre.")


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor],
                            source: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Rename a timm ConvNeXt state dict to the official layout (classifier keys are dropped).

    timm's small models (atto…nano) use 1×1 convs for the block MLP (``conv_mlp``); their C_out×C_in×1×1
    weights are reshaped to the Linear layers' C_out×C_in. Any other key is an :class:`InputError`.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_TIMM_IGNORED):
            continue
        for pattern, repl in _TIMM_RULES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                if new.endswith(("pwconv1.weight", "pwconv2.weight")) and value.ndim == 4:
                    value = value.flatten(1)
                out[new] = value
                break
        else:
            raise InputError(source, f"unsupported key {key!r} in timm ConvNeXt weights")
    return out


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a stem conv weight (C_out×C_src×k×k) to ``in_chans`` input channels.

    Rule: every new input channel gets the mean of the source channels scaled by ``C_src / in_chans``,
    i.e. ``w_new[:, c] = sum_s w[:, s] / in_chans``. The summed weight over input channels is unchanged,
    so a grey image repeated on all ``in_chans`` channels gives exactly the stem response the original
    network gives to that grey image repeated on its ``C_src`` channels (for ``in_chans == 1`` this is the
    usual "sum RGB kernels" rule for fluorescence).
    """
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / in_chans).repeat(1, in_chans, 1, 1).contiguous()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip error means "not usable weights"
        raise InputError(path, f"cannot read PyTorch weights ({type(exc).__name__}: {exc})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise InputError(path, "expected a (non-empty) state dict or {'model': state_dict}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(path, f"entry {bad[0]!r} is not a tensor; expected a state dict")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_convnext_weights(model: ConvNeXt, path: str | os.PathLike) -> WeightLoadReport:
    """Load ConvNeXt weights from a local file into ``model`` (in place).

    Accepts the official layout (optionally wrapped as ``{"model": state_dict}``, as the released
    checkpoints are) and the timm layout. The classifier (``norm``/``head``; timm ``head``/``norm_pre``)
    is ignored. A stem conv with a different number of input channels is adapted with
    :func:`adapt_input_channels`; any other missing key, extra key or shape mismatch is an
    :class:`InputError` naming the key.
    """
    path = Path(path)
    state = _read_state_dict(path)
    if any(k.startswith("stem.") or ".blocks." in k for k in state):
        layout = "timm"
        ignored = tuple(sorted(k for k in state if k.startswith(_TIMM_IGNORED)))
        state = convert_timm_state_dict(state, path)
    elif any(k.startswith("downsample_layers.") for k in state):
        layout = "official"
        ignored = tuple(sorted(k for k in state if k.startswith(_OFFICIAL_IGNORED)))
        state = {k: v for k, v in state.items() if not k.startswith(_OFFICIAL_IGNORED)}
    else:
        raise InputError(path, f"not ConvNeXt weights (neither official nor timm key layout; first key "
                               f"{next(iter(state))!r})")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(path, f"missing key {missing[0]!r} ({len(missing)} missing) for this ConvNeXt size")
    extra = [k for k in state if k not in expected]
    if extra:
        raise InputError(path, f"unexpected key {extra[0]!r} ({len(extra)} unexpected) for this ConvNeXt size")
    adapted = []
    stem = "downsample_layers.0.0.weight"
    for key, target in expected.items():
        value = state[key]
        if key == stem and value.ndim == 4 and value.shape[0] == target.shape[0] \
                and value.shape[2:] == target.shape[2:] and value.shape[1] != target.shape[1]:
            state[key] = adapt_input_channels(value, target.shape[1])
            adapted.append(key)
        elif value.shape != target.shape:
            raise InputError(path, f"shape of {key!r} is {tuple(value.shape)} in the file but "
                                   f"{tuple(target.shape)} in the model")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return WeightLoadReport(layout=layout, ignored=ignored, adapted=tuple(adapted))
