"""Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017) for the prompter.

Exact choice, following the released PromptNucSeg prompter (an mmdet FPN with ``num_outs = L`` over all four
ConvNeXt stages, read by multi-scale decoding at the anchor points):

1. Lateral 1×1 convs on all four backbone stages (strides 4, 8, 16, 32) and the top-down pathway
   (nearest ×2 upsampling + addition) from the stride-32 stage, FPN Fig. 3.
2. 3×3 output convs on the ``L`` finest merged maps: pyramid levels at strides 4, 8, …, 2^(L+1)
   (PanNuke L = 3 → 4, 8, 16; Kumar/CPM L = 4 → 4, 8, 16, 32). "L levels of the feature pyramid" in the
   supplementary §A is this ``num_outs``.
3. The feature used by the heads is fused on the anchor grid (stride λ): every pyramid level is sampled
   bilinearly at the anchor positions (cell centres (i + 0.5)·λ, pixel-centre convention), the L samples
   are concatenated and a 3×3 conv maps them back to ``dim`` channels. This is PromptNucSeg's multi-scale
   decoding at the anchors; when a level's stride equals λ its sample is that level itself.

Deviation: PromptNucSeg first moves each anchor with a learned offset (its deformable-proposal step) and
samples the levels at the moved points; here the levels are sampled at the fixed anchors, which makes the
sampling a plain resize of each level to the anchor grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from karyo.errors import InputError

ANCHOR_STRIDES = (4, 8, 16, 32)


class FPN(nn.Module):
    """FPN over the four backbone stages → one ``dim``-channel map on the stride-``anchor_stride`` grid."""

    def __init__(self, in_channels: Sequence[int], dim: int, levels: int, anchor_stride: int,
                 in_strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        in_channels, in_strides = tuple(int(c) for c in in_channels), tuple(int(s) for s in in_strides)
        if len(in_channels) != len(in_strides):
            raise InputError(None, f"FPN: {len(in_channels)} input channel counts for {len(in_strides)} strides")
        if not 1 <= levels <= len(in_channels):
            raise InputError(None, f"FPN levels L must be in 1..{len(in_channels)}, got {levels}")
        if anchor_stride not in ANCHOR_STRIDES:
            raise InputError(None, f"anchor stride λ must be one of {ANCHOR_STRIDES}, got {anchor_stride}")
        self.levels = int(levels)
        self.anchor_stride = int(anchor_stride)
        self.in_strides = in_strides
        self.level_strides: tuple[int, ...] = in_strides[:levels]
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size=3, padding=1) for _ in range(levels))
        self.fuse = nn.Conv2d(levels * dim, dim, kernel_size=3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # mmdet FPN default init (Xavier uniform, zero bias)
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def pyramid(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The L finest pyramid levels (strides ``level_strides``), each B×dim×(H/s)×(W/s)."""
        if len(features) != len(self.lateral):
            raise InputError(None, f"FPN expects {len(self.lateral)} backbone features, got {len(features)}")
        merged = [lat(f) for lat, f in zip(self.lateral, features, strict=True)]
        for i in range(len(merged) - 1, 0, -1):  # top-down: coarse → fine
            merged[i - 1] = merged[i - 1] + F.interpolate(merged[i], size=merged[i - 1].shape[-2:], mode="nearest")
        return [conv(merged[i]) for i, conv in enumerate(self.output)]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused B×dim×(H/λ)×(W/λ) feature; cell (i, j) describes the anchor at ((j+0.5)λ, (i+0.5)λ)."""
        return self.fuse_levels(self.pyramid(features))

    def fuse_levels(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Step 3 on the output of :meth:`pyramid` (callers that also read a level themselves run it once)."""
        s0 = self.level_strides[0]
        h, w = levels[0].shape[-2] * s0 // self.anchor_stride, levels[0].shape[-1] * s0 // self.anchor_stride
        sampled = [lv if lv.shape[-2:] == (h, w) else
                   F.interpolate(lv, size=(h, w), mode="bilinear", align_corners=False) for lv in levels]
        return self.fuse(torch.cat(sampled, dim=1))
