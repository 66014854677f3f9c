"""Run transformers' NemotronH torch modules as float64 oracles.

The torch reference paths upcast to float32 on purpose (`.float()`, `.to(torch.float32)`,
`softmax(..., dtype=torch.float32)`), which on float64 inputs would *lower* precision to float32.
`keep_float64()` makes those casts no-ops for float64 tensors while it is active, so the oracle
computes in float64 end to end and comparisons can be held to ~1e-12.
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

_to, _float, _softmax = torch.Tensor.to, torch.Tensor.float, F.softmax


def _to64(self, *args, **kwargs):
    if self.dtype == torch.float64:
        if args and args[0] is torch.float32:
            args = (torch.float64,) + args[1:]
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
    return _to(self, *args, **kwargs)


def _float64(self, *args, **kwargs):
    return self if self.dtype == torch.float64 else _float(self, *args, **kwargs)


def _softmax64(input, *args, dtype=None, **kwargs):
    if input.dtype == torch.float64 and dtype is torch.float32:
        dtype = torch.float64
    return _softmax(input, *args, dtype=dtype, **kwargs)


@contextlib.contextmanager
def keep_float64():
    torch.Tensor.to, torch.Tensor.float, F.softmax = _to64, _float64, _softmax64
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, F.softmax = _to, _float, _softmax


def t(x):
    """numpy/jax array -> float64 torch tensor (a copy)."""
    return torch.from_numpy(np.array(x, dtype=np.float64))


def set_linear(torch_linear, nnx_linear):
    """Copy a kernel (in..., out...) (nnx.Linear, or Dense with head axes) into a torch
    nn.Linear weight (out, in)."""
    kernel = np.asarray(nnx_linear.kernel[...]).reshape(torch_linear.in_features, -1)
    torch_linear.weight.data = t(kernel).T.contiguous()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
