"""Convolutions that oneDNN runs far below its speed on a CPU, computed another way with the same result.

A convolution with one or two output channels and a wide kernel (the last 7x7 layer of the line-art generator,
64 -> 1 channel) gives oneDNN nothing to vectorise over: on 2 cores it ran at a tenth of the speed of the
64-channel layers around it. As a matrix product it is fast: every pixel's C channels times every (output, tap)
weight in one GEMM, then the k*k shifted tap planes are summed. Same arithmetic, another summation order
(float32 results agree with float64 to ~1e-6 relative, closer than oneDNN's own).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_OUTPUTS = 4  # beyond a few output channels oneDNN's own kernel is efficient again


def few_output_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias) with stride 1, no padding, no dilation, one group, via one GEMM and k*k shifted sums.

    The tap planes are summed in float32 whatever the input dtype, so bf16/fp16 lose nothing to the k*k additions.
    """
    b, c, hp, wp = x.shape
    o, ci, kh, kw = weight.shape
    if ci != c:
        raise ValueError(f"few_output_conv2d: input has {c} channels, weight expects {ci}")
    h, w = hp - kh + 1, wp - kw + 1
    taps = weight.permute(0, 2, 3, 1).reshape(o * kh * kw, c)  # (outputs*taps, C)
    pixels = x.permute(0, 2, 3, 1).reshape(b, hp * wp, c)  # a free view when x is channels-last
    planes = torch.matmul(taps, pixels.transpose(1, 2)).view(b, o, kh, kw, hp, wp)
    out = torch.zeros(b, o, h, w, dtype=torch.float32, device=x.device)
    if bias is not None:
        out += bias.float().view(1, o, 1, 1)
    for dy in range(kh):
        for dx in range(kw):
            out += planes[:, :, dy, dx, dy : dy + h, dx : dx + w]
    return out.to(x.dtype)


class FewOutputConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and checkpoint keys) that uses `few_output_conv2d` on a CPU when it applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (
            self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1 and self.padding == (0, 0)
            and self.out_channels <= MAX_OUTPUTS and self.kernel_size[0] * self.kernel_size[1] > 1
        )
        if plain and x.device.type == "cpu" and x.dim() == 4:
            return few_output_conv2d(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
