"""The export's convolutions as GEMMs equal torch's convolutions."""

import pytest
import torch
from torch import nn

from semvoc.export.conv_as_gemm import conv1d_channels_last, depthwise_conv1d_channels_last, prelu_channels_last


@pytest.mark.parametrize(("k", "stride", "pad"), [(1, 1, 0), (3, 1, 1), (7, 1, 3), (2, 2, 0), (4, 4, 0), (3, 1, 0)])
def test_conv1d_channels_last_equals_conv1d(k, stride, pad):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 5, k, stride=stride, padding=pad)
    x = torch.randn(2, 6, 13)
    expected = conv(x).transpose(1, 2)
    torch.testing.assert_close(conv1d_channels_last(x.transpose(1, 2), conv), expected, rtol=1e-5, atol=1e-5)


def test_depthwise_and_prelu_channels_last():
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, 7, padding=3, groups=6)
    x = torch.randn(2, 6, 11)
    torch.testing.assert_close(depthwise_conv1d_channels_last(x.transpose(1, 2), conv), conv(x).transpose(1, 2),
                               rtol=1e-5, atol=1e-5)
    prelu = nn.PReLU(6)
    with torch.no_grad():
        prelu.weight.uniform_(-1, 1)
    torch.testing.assert_close(prelu_channels_last(x.transpose(1, 2), prelu), prelu(x).transpose(1, 2))


def test_unsupported_convolutions_are_named():
    with pytest.raises(ValueError, match="groups=1"):
        conv1d_channels_last(torch.zeros(1, 3, 4), nn.Conv1d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="depthwise"):
        depthwise_conv1d_channels_last(torch.zeros(1, 3, 4), nn.Conv1d(4, 4, 3))
