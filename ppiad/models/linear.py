"""`Linear`: a dense layer whose weight is stored [out_features, in_features], as torch and Hugging Face
checkpoints store it. Paddle's own nn.Linear keeps [in, out].

Why not nn.Linear: with the checkpoint's layout every weight is copied from the file as it is, without a
transposition (Qwen2-VL-2B: loading 4.8-5.5 s -> ~3 s on the 2-core machine, docs/performance.md), saving and
exporting need none either, and `matmul(x, W, transpose_y=True)` is as fast as Paddle's x W for prefill and
backward shapes and faster for the few rows of a decode step (4 x 8960 -> 1536: 4.9 -> 3.2 ms), where the
weight is read once, along its rows.

Random initialisation draws the same numbers nn.Linear would (Xavier-uniform over [in, out], then stored
transposed), so a seeded random model (ppiad.models.tiny) has the same weights as with nn.Linear.
"""
from __future__ import annotations

import math

import paddle
from paddle import nn


class _XavierDrawnAsInOut(nn.initializer.Initializer):
    """nn.Linear's default weight initialiser (Xavier-uniform, limit sqrt(6 / (in + out)), Glorot & Bengio
    2010) drawn in nn.Linear's [in, out] order from the global generator, stored as [out, in]."""

    def forward(self, var, block=None):
        out_features, in_features = var.shape
        limit = math.sqrt(6.0 / float(in_features + out_features)) if in_features and out_features else 0.0
        drawn = paddle.uniform([in_features, out_features], dtype=var.dtype, min=-limit, max=limit)
        paddle.transpose(drawn, [1, 0]).contiguous()._share_underline_tensor_to(var)
        return None


class Linear(nn.Layer):
    """y = x W^T + b.

    Args: in_features, out_features (int); bias_attr=False for no bias (as nn.Linear); weight_attr optional.
    Shapes: x [..., in_features] -> y [..., out_features]; weight [out_features, in_features], bias
    [out_features]; dtype that of the parameters (float32, or bfloat16 after AMP O2 decoration).
    """

    def __init__(self, in_features: int, out_features: int, bias_attr=None, weight_attr=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.create_parameter([out_features, in_features], attr=weight_attr,
                                            default_initializer=_XavierDrawnAsInOut())
        self.bias = None if bias_attr is False else self.create_parameter([out_features], attr=bias_attr,
                                                                          is_bias=True)

    @classmethod
    def sharing(cls, weight, bias=None) -> "Linear":
        """A Linear computing with these existing parameters (weight [out, in], bias [out] or None)."""
        layer = cls.__new__(cls)
        nn.Layer.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = paddle.matmul(x, self.weight, transpose_y=True)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
