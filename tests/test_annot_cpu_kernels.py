"""The CPU-side rewrites of slow layers compute what PyTorch's own layers compute."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from annotators.cpu_kernels import FewOutputConv2d, few_output_conv2d


@pytest.mark.parametrize("batch,outputs,kernel", [(1, 1, 7), (2, 2, 5), (3, 1, 3)])
def test_few_output_conv_equals_conv2d(batch, outputs, kernel):
    g = torch.Generator().manual_seed(batch * 10 + outputs)
    x = torch.randn(batch, 16, 23, 31, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(outputs, 16, kernel, kernel, generator=g) / kernel, torch.randn(outputs, generator=g)
    want = F.conv2d(x.double(), w.double(), b.double())
    got = few_output_conv2d(x, w, b)
    assert got.shape == want.shape == (batch, outputs, 23 - kernel + 1, 31 - kernel + 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(few_output_conv2d(x.contiguous(), w, None).double(), want - b.double().view(1, -1, 1, 1), atol=1e-5, rtol=1e-5)


def test_few_output_conv_in_bfloat16_sums_in_float32():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 64, 40, 40, generator=g), torch.randn(1, 64, 7, 7, generator=g) / 56
    want = F.conv2d(x.bfloat16().double(), w.bfloat16().double())
    got = few_output_conv2d(x.bfloat16(), w.bfloat16(), None)
    assert got.dtype == torch.bfloat16
    # only the GEMM's bf16 products and the final rounding to bf16 differ from exact maths
    assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-2


def test_the_module_keeps_conv2d_keys_and_falls_back_where_the_rewrite_does_not_apply():
    torch.manual_seed(0)
    fast, plain = FewOutputConv2d(8, 1, 7), torch.nn.Conv2d(8, 1, 7)
    assert list(fast.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 20, 20)
    torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    padded, plain_padded = FewOutputConv2d(8, 1, 3, padding=1, stride=2), torch.nn.Conv2d(8, 1, 3, padding=1, stride=2)
    plain_padded.load_state_dict(padded.state_dict())
    torch.testing.assert_close(padded(x), plain_padded(x), atol=1e-6, rtol=1e-6)
