"""Small layers shared by karyo's networks (ViT, SAM-style segmentor, heads).

Module and parameter names follow Segment Anything (``LayerNorm2d``, ``MLPBlock.lin1/lin2``, ``MLP.layers``) so
that the checkpoints of those projects load with an identity key map.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "ActName", "DropPath", "LayerNorm2d", "MLPBlock", "QuickGELU", "make_act"]

ActName = str  # "gelu" | "quick_gelu" | "relu"


class QuickGELU(nn.Module):
    """``x·sigmoid(1.702·x)``: the GELU approximation OpenAI CLIP was trained with (weights expect it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: ActName) -> nn.Module:
    """Activation module by config name (``"gelu"``, ``"quick_gelu"`` or ``"relu"``)."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; expected 'gelu', 'quick_gelu' or 'relu'")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a B×C×H×W map (SAM's ``LayerNorm2d``; eps 1e-6 as in SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.layer_norm over a channels-last view is one fused kernel (cheaper than SAM's mean/var formulation,
        # numerically the same normalisation).
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Transformer feed-forward ``lin2(act(lin1(x)))`` (SAM's ``MLPBlock`` names)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: ActName = "gelu"):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = make_act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (SAM's hypernetwork / IoU-head ``MLP``, ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` during training (Huang et al. 2016).

    Kept samples are rescaled by ``1/(1-p)`` so the expectation is unchanged; identity at eval time.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
