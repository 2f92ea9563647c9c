"""End-to-end throughput of a karyo model on 256² tiles, against a HoVer-Net-sized network's bare forward
pass measured in the same process (so the ratio does not depend on the machine's speed).

    python -m benchmarks.throughput --model default

The reference network follows HoVer-Net's layout (Graham et al. 2019: pre-activation ResNet-50 encoder, a 1×1
bottleneck to 1024 channels, and three decoder branches (NP, HV, NT) of 5×5 convolutions and dense units; the
parameter count is printed with the result). It is random-initialised and only timed, never trained: its time is
a lower bound for HoVer-Net, whose post-processing is not included.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import karyo
from benchmarks._report import invocation, update_section
from karyo.data.layout import LayoutDataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, mid, 1, bias=False),
                                  nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid, 3, stride, 1, bias=False),
                                  nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, cout, 1, bias=False))
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x):
        return self.body(x) + self.skip(x)


def _stage(cin: int, mid: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(cin, mid, stride)] + [Bottleneck(mid * 4, mid, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class DenseUnit(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 128, 1, bias=False),
                                  nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 32, 5, padding=2, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def _dense(cin: int, units: int, cout: int) -> nn.Sequential:
    layers, c = [], cin
    for _ in range(units):
        layers.append(DenseUnit(c))
        c += 32
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, cout, 1, bias=False))


class Decoder(nn.Module):
    def __init__(self, out_ch: int):
        super().__init__()
        self.u3 = nn.Sequential(nn.Conv2d(1024, 256, 5, padding=2, bias=False), _dense(256, 8, 512))
        self.u2 = nn.Sequential(nn.Conv2d(512, 128, 5, padding=2, bias=False), _dense(128, 4, 256))
        self.u1 = nn.Sequential(nn.Conv2d(256, 64, 5, padding=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                nn.Conv2d(64, out_ch, 1))
    def forward(self, feats):
        f1, f2, f3, f4 = feats
        up = nn.functional.interpolate
        x = self.u3(up(f4, scale_factor=2.0) + f3)
        x = self.u2(up(x, scale_factor=2.0) + f2)
        return self.u1(up(x, scale_factor=2.0) + f1)


class HoVerNetSized(nn.Module):
    """Pre-activation ResNet-50 + NP, HV and NT decoders (HoVer-Net's layout and size)."""

    def __init__(self, n_types: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.s1, self.s2 = _stage(64, 64, 3, 1), _stage(256, 128, 4, 2)
        self.s3, self.s4 = _stage(512, 256, 6, 2), _stage(1024, 512, 3, 2)
        self.conv_bot = nn.Conv2d(2048, 1024, 1, bias=False)
        self.decoders = nn.ModuleList([Decoder(2), Decoder(2), Decoder(n_types)])

    def forward(self, x):
        f1 = self.s1(self.stem(x))
        f2 = self.s2(f1)
        f3 = self.s3(f2)
        f4 = self.conv_bot(self.s4(f3))
        return [d([f1, f2, f3, f4]) for d in self.decoders]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tiles", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = LayoutDataset(args.data / "consep", split="test")
    images = [ds[i].image for i in range(min(args.tiles, len(ds)))]
    model = karyo.load(args.model)
    model.segment(images[0])  # warm-up
    t0 = time.perf_counter()
    nuclei = sum(model.segment(im).n_nuclei for im in images)
    ours = time.perf_counter() - t0
    ref = HoVerNetSized().eval()
    params = sum(p.numel() for p in ref.parameters())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref(x)
        t0 = time.perf_counter()
        for _ in range(len(images)):
            ref(x)
        theirs = time.perf_counter() - t0
    n = len(images)
    body = (f"| | tiles/s (256², {args.threads} threads) | per tile |\n|---|---|---|\n"
            f"| karyo `{args.model}`: `model.segment` end to end (pre-processing, network(s), post-processing) | "
            f"{n / ours:.2f} | {1000 * ours / n:.0f} ms |\n"
            f"| HoVer-Net-sized network ({params / 1e6:.1f} M parameters), forward pass only | {n / theirs:.2f} | "
            f"{1000 * theirs / n:.0f} ms |\n\n"
            f"Ratio: karyo end to end is **{theirs / ours:.1f}×** the speed of the HoVer-Net-sized forward pass alone "
            f"({n} CoNSeP test tiles, {nuclei} nuclei found). Target: ≥ 5 tiles/s end to end.")
    print(body)
    if not args.no_write:
        update_section(f"throughput_{args.model}", f"Throughput of `{args.model}` vs a HoVer-Net-sized network", body,
                       invocation("benchmarks.throughput"))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
