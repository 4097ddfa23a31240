"""MAC formulas for the ops ``torch.utils.flop_counter`` does not count: one table, used by
the analysis (through FlopCounterMode) and by the pruner's graph estimates alike.

Convention: one multiply-accumulate = 1 MAC = 2 FLOPs.

* **Convolutions and matrix products** (``conv*``, ``linear``/``addmm``/``mm``, ``bmm``,
  ``baddbmm``, ``matmul`` and ``einsum``, which decompose to those): torch's own formulas,
  MACs = FLOPs / 2. Bias additions count 0, as in torch's counter.
* **Matrix-vector and friends torch does not count**: ``mv``/``addmv`` (m*n),
  ``addbmm`` and ``_addmm_activation`` (b*m*n*k), ``dot``/``vdot`` (n).
* **Attention**: ``scaled_dot_product_attention`` counts ``QK^T`` and ``AV`` with torch's
  ``sdpa_flop_count`` (batch * heads * Lq * Lk * (Dq + Dv) MACs) for every kernel, including
  the CPU flash kernel torch's counter misses. ``nn.MultiheadAttention`` /
  ``nn.TransformerEncoderLayer`` are counted with the fused "fast path" disabled, so their
  projections and attention are seen as the matmuls and SDPA they compute (the fused
  kernels are invisible to torch's counter); timing keeps the fast path.
* **Interpolation**, per output element (i.e. per channel and output pixel): bilinear 4
  (its 4 taps), linear 2, trilinear 8, bicubic 16; antialiased variants as their plain
  mode; nearest 0 (a copy). ``grid_sample``: bilinear 4, bicubic 16, nearest 0 per output
  element (trilinear 8 in 3-D).
* **Average pooling**: one MAC (an add) per input element read: ``kernel_size`` adds per
  output element for ``avg_pool``; for adaptive pooling the exact window sizes, so global
  average pooling counts C*H*W. ``mean`` and ``sum`` reductions count one MAC per input
  element too, because PyTorch runs ``AdaptiveAvgPool2d(1)`` as ``mean``. Max pooling 0.
* **Recurrent layers** (LSTM, GRU, RNN): every input row (time x batch, or a packed
  sequence's rows) is multiplied by each weight matrix of each layer and direction once:
  rows x (input-to-gates + state-to-gates + projection weights). torch's counter sees the
  matmuls where the layer decomposes (GRU/RNN on CPU, LSTM with ``proj_size``) but not the
  fused kernels (``mkldnn_rnn_layer``, LSTM on CPU; ``_cudnn_rnn``), counted here alike.
* **Everything else counts 0**: elementwise ops, activations, normalisation layers,
  softmax, concatenation, copies (memory-bound; thop and torch's counter do the same).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import sdpa_flop_count

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _first_shape(out_shape):
    """The first output's shape (ops with several outputs get a tuple of shapes)."""
    if isinstance(out_shape, (tuple, list)) and out_shape and isinstance(out_shape[0], (tuple, list, torch.Size)):
        return out_shape[0]
    return out_shape


# Every formula below receives shapes in place of tensors (FlopCounterMode's shape_wrapper)
# and returns FLOPs = 2 * MACs, so that the whole counter speaks FLOPs like torch's formulas.

def _per_output_element(macs: int):
    def formula(*args, out_shape=None, **kwargs) -> int:
        return 2 * macs * _numel(_first_shape(out_shape))

    return formula


def _avg_pool(dims: int):
    def formula(input_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
        kernel = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size]
        if len(kernel) == 1:
            kernel = kernel * dims
        return 2 * math.prod(kernel) * _numel(out_shape)

    return formula


def _adaptive_windows(size_in: int, size_out: int) -> int:
    """Sum of the adaptive pooling window lengths along one dimension."""
    return sum(math.ceil((i + 1) * size_in / size_out) - (i * size_in) // size_out for i in range(size_out))


def _adaptive_avg_pool(input_shape, output_size, *args, out_shape=None, **kwargs) -> int:
    n_spatial = len(output_size)
    lead = _numel(input_shape[: len(input_shape) - n_spatial])
    windows = math.prod(_adaptive_windows(i, o) for i, o in zip(input_shape[-n_spatial:], out_shape[-n_spatial:]))
    return 2 * lead * windows


def _reduction(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input_shape)


def _mv(mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat_shape[0] * mat_shape[1]


def _addmv(self_shape, mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv(mat_shape, vec_shape)


def _dot(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(a_shape)


def _addbmm(self_shape, b1_shape, b2_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = b1_shape
    return 2 * b * m * k * b2_shape[-1]


def _addmm_activation(self_shape, m1_shape, m2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * m1_shape[0] * m1_shape[1] * m2_shape[1]


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grid_sample(taps: dict[int, int]):
    def formula(input_shape, grid_shape, interpolation_mode, *args, out_shape=None, **kwargs) -> int:
        return 2 * taps.get(int(interpolation_mode), 0) * _numel(_first_shape(out_shape))

    return formula


def _input_rows(input_shape) -> int:
    return _numel(input_shape) // input_shape[-1] if input_shape else 0


def _weight_matrices(weights) -> int:
    """Elements of the 2-d weights (biases, 1-d, count 0)."""
    return sum(_numel(w) for w in weights if w is not None and len(w) == 2)


def _mkldnn_rnn_layer(input_shape, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    return 2 * _input_rows(input_shape) * _weight_matrices((w_ih, w_hh))


def _cudnn_rnn(input_shape, weights, *args, out_shape=None, **kwargs) -> int:
    return 2 * _input_rows(input_shape) * _weight_matrices(weights)


def _packets(*names: str) -> list:
    """aten op packets by name, skipping those this torch build lacks."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _mapping() -> dict[Any, Any]:
    table: dict[Any, Any] = {}
    for names, formula in (
        (("upsample_bilinear2d", "_upsample_bilinear2d_aa"), _per_output_element(4)),
        (("upsample_linear1d",), _per_output_element(2)),
        (("upsample_trilinear3d",), _per_output_element(8)),
        (("upsample_bicubic2d", "_upsample_bicubic2d_aa"), _per_output_element(16)),
        (("avg_pool1d",), _avg_pool(1)),
        (("avg_pool2d",), _avg_pool(2)),
        (("avg_pool3d",), _avg_pool(3)),
        (("_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d"), _adaptive_avg_pool),
        (("mean", "sum"), _reduction),
        (("mv",), _mv),
        (("addmv",), _addmv),
        (("dot", "vdot"), _dot),
        (("addbmm",), _addbmm),
        (("_addmm_activation",), _addmm_activation),
        (("_scaled_dot_product_flash_attention_for_cpu",), _sdpa_cpu),
        (("grid_sampler_2d",), _grid_sample({0: 4, 1: 0, 2: 16})),
        (("grid_sampler_3d",), _grid_sample({0: 8, 1: 0})),
        (("mkldnn_rnn_layer",), _mkldnn_rnn_layer),
        (("_cudnn_rnn",), _cudnn_rnn),
    ):
        for packet in _packets(*names):
            table[packet] = formula
    return table


#: Extra formulas handed to ``FlopCounterMode(custom_mapping=...)`` (FLOPs, i.e. 2 x MACs).
CUSTOM_MAPPING: dict[Any, Any] = _mapping()
