"""The conv configurations every fused conv op is tested on (issue: 1x1 to
11x11, strides, groups, depthwise, dilation, odd sizes, batch 1)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvConfig:
    name: str
    cin: int
    cout: int
    k: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    hw: tuple = (9, 9)
    batch: int = 2

    def scaled(self, small: bool) -> "ConvConfig":
        """Small shapes for the Triton interpreter: fewer channels, same structure."""
        if not small:
            return self
        div = 4 if self.groups == 1 else 1
        return ConvConfig(self.name, max(self.cin // div, 3), max(self.cout // div, 2), self.k,
                          self.stride, self.padding, self.dilation, self.groups,
                          tuple(min(s, 12) for s in self.hw), self.batch)


CONFIGS = [
    ConvConfig("1x1", 32, 48, 1),
    ConvConfig("3x3", 24, 32, 3, padding=1),
    ConvConfig("3x3-stride2", 24, 32, 3, stride=2, padding=1, hw=(10, 11)),
    ConvConfig("1x1-stride2", 32, 48, 1, stride=2, hw=(10, 9)),
    ConvConfig("5x5", 16, 24, 5, padding=2),
    ConvConfig("7x7-stride2", 3, 16, 7, stride=2, padding=3, hw=(17, 15)),
    ConvConfig("11x11-stride4", 3, 16, 11, stride=4, padding=2, hw=(35, 35)),
    ConvConfig("groups32", 64, 64, 3, padding=1, groups=32),
    ConvConfig("depthwise", 24, 24, 3, padding=1, groups=24),
    ConvConfig("depthwise5-stride2", 16, 16, 5, stride=2, padding=2, groups=16, hw=(11, 11)),
    ConvConfig("dilation2", 16, 16, 3, padding=2, dilation=2),
    ConvConfig("odd-sizes", 13, 19, 3, padding=1, hw=(7, 5)),
    ConvConfig("batch1", 16, 32, 3, padding=1, batch=1),
]
IDS = [c.name for c in CONFIGS]
BY_NAME = {c.name: c for c in CONFIGS}

# gradcheck's cost is (input elements) x (output elements): keep it tiny.
GRADCHECK = ConvConfig("gradcheck", 3, 4, 3, stride=2, padding=1, hw=(5, 6))

# fp32 1x1 convs on each side of the cpu backend's GEMM rules
# (convkernels/ops/_gemm1x1.py), with whether each layout takes the GEMMs
# (forward and backward alike for these shapes) or aten's conv.
CPU_1X1 = [
    (ConvConfig("1x1-28", 64, 32, 1, hw=(28, 28)), {"nchw": True, "channels_last": True}),
    (ConvConfig("1x1-stride2", 64, 32, 1, stride=2, hw=(28, 27)),
     {"nchw": True, "channels_last": True}),
    (ConvConfig("1x1-56", 64, 32, 1, hw=(56, 56)), {"nchw": True, "channels_last": False}),
    (ConvConfig("1x1-large-weight", 512, 512, 1, hw=(7, 7)),
     {"nchw": False, "channels_last": True}),
]
