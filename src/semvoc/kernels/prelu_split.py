"""The vocoder's ConvNeXt MLP as three GEMMs with nothing between them (``--cuda-kernels``).

A block ends ``x' = W2 prelu(W1 y + b1) + b2 + s * x`` (PReLU slope ``a`` per hidden channel,
residual scale ``s`` per channel). On onnxruntime that is GEMM, a ``BiasPRelu`` pass over the
3x-wide hidden tensor, GEMM, a ``BiasResidual`` pass: at batch 16 the two passes cost as much as
a third of the block's GEMM time. cuBLASLt's epilogues have a ReLU but no PReLU, and take a
residual with beta = 1 but (in fp16) no per-channel beta. Two exact rewrites remove both passes:

- PReLU is linear plus a ReLU: ``prelu(h) = a h + (1 - a) relu(h)``, so
  ``W2 prelu(W1 y + b1) = (W2 diag(1 - a)) relu(W1 y + b1) + (W2 diag(a) W1) y + W2 (a b1)``:
  a GEMM with cuBLASLt's RELU_BIAS epilogue, and a C x C GEMM (1/6 more multiply-adds than the
  MLP's two, less time than the pass it replaces at the batch sizes that are compute-bound).
- The residual scale moves into the stored activations: the decoder keeps ``v_l = x_l / g_l``
  with ``g_l = s_1 ... s_l`` (per channel), so that ``v_l = v_{l-1} + (block l's MLP) / g_l``, an
  unscaled residual (cuBLASLt's C, beta = 1). ``g_{l-1}`` goes into block l's depthwise weights
  (``dw(g v) = (w g) * v``), ``1 / g_l`` into its output rows, ``g_L`` into the decoder's
  output projection. In fp16 the stored ``v_l`` must stay in range: the export's calibration
  (the largest ``|s x_{l-1}|`` and ``|MLP output|`` of every block in a short fp32 generation)
  bounds ``|x_l|``, and the split is used where ``bound_l / min |g_l|`` keeps 16x headroom below
  fp16's largest value (``gains_fit``); without calibration, where every gain is within
  ``[1/16, 16]``. Elsewhere (or with a zero scale) the decoder keeps the unsplit form.

So a block is ``ConvNeXtMix`` and three ``LtGemm`` calls (``split_mlp``):
``r = relu(y W1^T + b1)``, ``t = y M^T + c + v``, ``v' = r R^T + t``. The weights are computed once,
in float64, at export (``split_weights``). By default the export runs the last two as one GEMM
over ``[r | y]`` (``semvoc.kernels.split_mlp``: ``ConvNeXtMix`` and one ``SplitMlp`` per block).

Used by every ``--cuda-kernels`` export where the bounds above allow;
``SEMVOC_EXPORT_WITHOUT=PReLUSplit`` keeps the unsplit blocks. Measured on an H200 (reference
preset, fp16, 10-s clips; ``benchmarks/results/h200-2026-12-02e.md`` and ``-02f.md``): vocoder
step 8.08 -> 7.14 ms at batch 16 and 0.93 -> 0.88 ms at batch 1 (whole loops), the warm batch-16
request 3.68 -> 3.52 s and GPU memory after it 8,008 -> 7,728 MiB (the extra weights are 61 MB),
SNR 54.4 dB against PyTorch fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from semvoc.kernels.ltgemm import linear as lt_linear

NAME = "PReLUSplit"  # SEMVOC_EXPORT_WITHOUT=PReLUSplit leaves it out of an export
FP16_STORED_LIMIT = 65504.0 / 16  # calibrated bound of a stored activation: 16x below fp16's largest
GAIN_RANGE = (1.0 / 16.0, 16.0)  # without calibration


def residual_gains(scales: list[torch.Tensor | None], channels: int) -> list[torch.Tensor] | None:
    """The gains ``[g_0, g_1, ..., g_L]`` (``[C]`` each, float64) of a decoder whose blocks have
    residual scales ``scales`` (``None``: no scale): ``g_0 = 1``, ``g_l = g_{l-1} * s_l``; block l
    reads ``g_{l-1}`` and writes ``g_l``. None where a gain is 0 or not finite."""
    gains = [torch.ones(channels, dtype=torch.float64)]
    for scale in scales:
        gain = gains[-1] if scale is None else gains[-1] * scale.detach().double().reshape(-1)
        if not torch.isfinite(gain).all() or not gain.abs().min() > 0:
            return None
        gains.append(gain)
    return gains


def output_bounds(maxima: dict[str, float], prefix: str, blocks: int, scaled: bool) -> list[float] | None:
    """Upper bounds of ``|x_l|``, every block's output, from the calibration maxima of the modules
    under ``prefix`` (the decoder's name + "."): ``|x_l| <= max |s x_{l-1}| + max |MLP output|``,
    with ``|x_{l-1}|``'s own bound (from the input norm on) where a block has no scale. None where
    the calibration did not see them."""
    bound = maxima.get(prefix + "in_norm")
    bounds = []
    for layer in range(blocks):
        block = f"{prefix}blocks.{layer}."
        residual = maxima.get(block + "residual_scale") if scaled else bound
        mlp = maxima.get(block + "pwconv2")
        if residual is None or mlp is None:
            return None
        bound = residual + mlp
        bounds.append(bound)
    return bounds


def gains_fit(gains: list[torch.Tensor], bounds: list[float] | None) -> bool:
    """Whether fp16 holds the stored activations ``x_l / g_l`` (``gains[1:]`` against ``bounds``
    of ``|x_l|``, see ``output_bounds``): each bound over its smallest gain within
    ``FP16_STORED_LIMIT``; without bounds, every gain within ``GAIN_RANGE``."""
    if bounds is None:
        return all(GAIN_RANGE[0] <= g.abs().min() and g.abs().max() <= GAIN_RANGE[1] for g in gains)
    return all(b / g.abs().min().item() <= FP16_STORED_LIMIT for g, b in zip(gains, bounds, strict=True))


@dataclass
class SplitWeights:
    """One block's weights in the split form (nn.Linear layouts ``[out, in]``)."""

    dw_weight: torch.Tensor  # [C, 1, K]: the depthwise weights times g_in
    linear_weight: torch.Tensor  # [C, C]: M = diag(1/g_out) W2 diag(a) W1
    linear_bias: torch.Tensor  # [C]: c = (W2 (a b1) + b2) / g_out
    relu_weight: torch.Tensor  # [C, H]: R = diag(1/g_out) W2 diag(1 - a)


def split_weights(dw_weight: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, slope: torch.Tensor,
                  w2: torch.Tensor, b2: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor) -> SplitWeights:
    """dw_weight ``[C, 1, K]``, w1 ``[H, C]``, b1 ``[H]``, slope ``[H]`` or ``[1]``, w2 ``[C, H]``,
    b2 ``[C]``, gains ``[C]`` -> the split form, computed in float64, returned in w1's dtype."""
    dtype = w1.dtype
    w1, b1, w2, b2 = (t.detach().double() for t in (w1, b1, w2, b2))
    a = slope.detach().double().reshape(-1).expand(w1.shape[0])
    gain_in, gain_out = gain_in.double(), gain_out.double()
    weights = SplitWeights(
        dw_weight=dw_weight.detach().double() * gain_in[:, None, None],
        linear_weight=(w2 * a) @ w1 / gain_out[:, None],
        linear_bias=(w2 @ (a * b1) + b2) / gain_out,
        relu_weight=w2 * (1.0 - a) / gain_out[:, None],
    )
    return SplitWeights(*(t.to(dtype) for t in vars(weights).values()))


def split_mlp(y: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, linear_weight: torch.Tensor,
              linear_bias: torch.Tensor, relu_weight: torch.Tensor, linear: Callable = lt_linear) -> torch.Tensor:
    """The block's MLP and residual in the split form: y ``[..., C]`` (ConvNeXtMix's output),
    v ``[..., C]`` (the block's stored input) -> the block's stored output ``[..., C]``."""
    r = linear(y, w1, b1, relu=True)  # [..., H]
    t = linear(y, linear_weight, linear_bias, v)  # the linear part of PReLU, its biases, the residual
    return linear(r, relu_weight, None, t)
