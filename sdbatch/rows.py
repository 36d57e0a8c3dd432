"""Row independence: an item's pixels must not depend on which other items share its batch.

CPU kernels pick algorithms by shape (BLAS by row count, oneDNN by batch size), which
changes the last bits of every row. These helpers make a model's results per row equal
to what that row would get alone. Public API for plugins that load extra networks
(ControlNets, adapters); torch is imported only when a helper is called.
"""

from __future__ import annotations

import contextlib

_ROWWISE_CLASS = None


def _rowwise_linear_class():
    """A Linear subclass whose 2-D inputs are multiplied one row at a time (built on first use)."""
    global _ROWWISE_CLASS
    if _ROWWISE_CLASS is None:
        import torch

        class RowwiseLinear(torch.nn.Linear):
            """CPU BLAS picks different kernels for 1 row and for several (the U-Net's time
            embeddings are (batch, features)); per-row products cost nothing at that size."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.dim() == 2 and x.shape[0] > 1:
                    return torch.cat([torch.nn.functional.linear(row[None], self.weight, self.bias) for row in x])
                return torch.nn.functional.linear(x, self.weight, self.bias)

        _ROWWISE_CLASS = RowwiseLinear
    return _ROWWISE_CLASS


def make_rows_independent(module) -> None:
    """Swap plain Linear layers for row-wise ones (same weights, same results per row)."""
    import torch

    rowwise = _rowwise_linear_class()
    for child in module.modules():
        if type(child) is torch.nn.Linear:
            child.__class__ = rowwise


def row_independent_kernels(device):
    """A context in which CPU convolutions do not choose algorithms by batch size (oneDNN off)."""
    import torch

    if str(device) != "cpu":
        return contextlib.nullcontext()
    return torch.backends.mkldnn.flags(enabled=False)
