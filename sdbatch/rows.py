"""Row independence: an item's pixels must not depend on which other items share its batch.

CPU kernels pick algorithms by shape, which changes the last bits of every row: MKL's
GEMM takes other paths for a few rows (1-3 rows on one thread, any count not a multiple
of 4 below 12-28 with more threads), and PyTorch's convolution dispatch picks by batch
size among its own im2col kernel (one small image, 1x1 kernels on one thread), oneDNN
and NNPACK (16 images and up, i.e. batch 8 with CFG).

The swap below makes every Linear one GEMM whose row count is padded to a multiple of
``ROW_BLOCK``, so each row's sums run in the same order whatever the batch, and calls every
plain Conv2d's kernel directly, chosen by the layer alone: oneDNN, whose forward
convolution loops over images outside its reduction, so an image gets the same bits at any
batch size, position or thread count; for pointwise (1x1) layers PyTorch's own kernel, one
GEMM per image of one shape, which is faster there. ``tests/test_rows.py`` checks both
premises on the machine that runs the suite; it was PyTorch's dispatch, not the kernels,
that changed with the batch. Without oneDNN (or for dtypes it does not take) a
convolution is im2col and one row-independent GEMM. The rest of a denoiser is
row-independent as PyTorch implements it: GroupNorm and LayerNorm reduce per row,
``scaled_dot_product_attention`` splits work by sequence length and per (batch, head), the
scheduler step is elementwise. Public API for plugins that load extra networks
(ControlNets, adapters); torch is imported only when a helper is called.
"""

from __future__ import annotations

import contextlib

# GEMM row counts are padded to a multiple of this: MKL gives each row the same result
# for any row count that is a multiple of 4 (checked at 1 to 16 threads); 16 leaves margin.
ROW_BLOCK = 16
# A convolution's im2col matrix stays under this per GEMM (SDXL's 128x128 latents would need GBs).
PATCH_BYTES = 128 << 20

_CLASSES: dict = {}


def rows_matmul(rows, weight, bias=None):
    """``rows @ weight.T + bias`` for a 2-D ``rows``, each row's result independent of the row count."""
    import torch

    rows = rows.contiguous()  # a column-major view (a 1x1 convolution of one image) takes another kernel
    count = rows.shape[0]
    padded = -count % ROW_BLOCK
    if padded:
        rows = torch.cat([rows, rows.new_zeros(padded, rows.shape[1])])
    out = torch.addmm(bias, rows, weight.t()) if bias is not None else rows @ weight.t()
    return out[:count] if padded else out


def pad_rows(rows, count: int):
    """``rows`` with copies of its last row appended up to ``count`` rows."""
    import torch

    if len(rows) >= count:
        return rows
    return torch.cat([rows, rows[-1:].expand(count - len(rows), *rows.shape[1:])])


def fixed_chunks(rows, size: int) -> list:
    """``rows`` in chunks of exactly ``size`` (the last padded with copies of the last row): one kernel
    shape for every call, so on a GPU a row's result does not depend on the rows that share its call."""
    return [pad_rows(rows[start:start + size], size) for start in range(0, len(rows), size)]


def invariant_linear(x, weight, bias=None):
    """``F.linear`` for inputs of any rank as one row-independent GEMM."""
    flat = x.reshape(-1, x.shape[-1])
    return rows_matmul(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


def direct_conv2d(conv, x):
    """A Conv2d through a kernel chosen by the layer alone, never by the batch size.

    Pointwise (1x1, stride 1) convolutions run PyTorch's own kernel, one GEMM per image of
    one shape (faster than oneDNN for them); the others call oneDNN directly. For oneDNN the
    input takes the weight's memory format, so the kernel depends on the layer (and the
    model's ``channels_last`` option) only, never on how the batch arrived.
    """
    import torch

    weight = conv.weight
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        return torch.ops.aten.thnn_conv2d(x.contiguous(), weight.contiguous(), [1, 1], conv.bias)
    channels_last = not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.mkldnn_convolution(x, weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)


def onednn_fits(x) -> bool:
    """Whether ``x`` can take the direct oneDNN convolution (CPU float32 or bfloat16)."""
    import torch

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def invariant_conv2d(conv, x):
    """A Conv2d as im2col and row-independent GEMMs, for CPUs and dtypes without oneDNN.

    Patches are gathered channels-last (one strided copy) into one GEMM over the whole batch,
    as fast as oneDNN here; past ``PATCH_BYTES`` they go by image and band of output rows.
    """
    import torch

    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    batch, channels, height, width = x.shape
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # gathering from a dense NHWC copy is faster
    if ph or pw:
        nhwc = torch.nn.functional.pad(nhwc, (0, 0, pw, pw, ph, ph))
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    s = nhwc.stride()
    patches = nhwc.as_strided((batch, out_h, out_w, kh, kw, channels), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]))
    columns = kh * kw * channels
    weight = _patch_weight(conv)
    limit = max(ROW_BLOCK, PATCH_BYTES // (columns * x.element_size()))  # patch rows per GEMM
    if batch * out_h * out_w <= limit:
        out = rows_matmul(patches.reshape(-1, columns), weight, conv.bias)
    else:
        band = max(1, limit // out_w)
        out = torch.cat([rows_matmul(patches[image, top:top + band].reshape(-1, columns), weight, conv.bias)
                         for image in range(batch) for top in range(0, out_h, band)])
    return out.view(batch, out_h, out_w, conv.out_channels).permute(0, 3, 1, 2).contiguous()


def _patch_weight(conv):
    """The kernel as (out channels, kh*kw*in channels), patch order; kept until the weight changes."""
    weight = conv.weight
    try:
        key = (weight.data_ptr(), weight._version)
    except RuntimeError:  # a weight made under inference_mode has no version counter: no cache
        key = None
    cached = conv.__dict__.get("_rows_weight")
    if key is None or cached is None or cached[0] != key:
        cached = (key, weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous())
        if key is not None:
            conv.__dict__["_rows_weight"] = cached
    return cached[1]


def _gemm_conv_fits(conv) -> bool:
    """Plain convolutions (the denoisers' and VAEs') take oneDNN or the GEMM path; others keep PyTorch's."""
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _invariant_classes():
    """Linear and Conv2d subclasses with row-independent forwards (built on first use)."""
    if not _CLASSES:
        import torch

        class RowIndependentLinear(torch.nn.Linear):
            """Linear as one GEMM with a padded row count (the U-Net's (batch, features) time
            embeddings would otherwise take MKL's few-row path)."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return invariant_linear(x, self.weight, self.bias)

        class RowIndependentConv2d(torch.nn.Conv2d):
            """Conv2d through `direct_conv2d` (or im2col + one GEMM without oneDNN);
            unusual convolutions (groups, dilation) run PyTorch's per-image kernel with
            oneDNN and NNPACK off."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if _gemm_conv_fits(self) and x.dim() == 4:
                    # torch.compile cannot trace the direct call: the GEMMs compile (and stay row-independent)
                    if onednn_fits(x) and not torch.compiler.is_compiling():
                        try:
                            return direct_conv2d(self, x)
                        except NotImplementedError:  # forward-mode AD (torch.func.jvp) has no oneDNN formula
                            pass
                    return invariant_conv2d(self, x)
                with row_independent_kernels("cpu"):
                    return super().forward(x)

        _CLASSES[torch.nn.Linear] = RowIndependentLinear
        _CLASSES[torch.nn.Conv2d] = RowIndependentConv2d
    return _CLASSES


def make_rows_independent(module) -> None:
    """Swap every plain Linear and Conv2d of ``module`` for a row-independent one (same weights).

    Generic over architectures: U-Nets, transformers, ControlNets and VAEs are built from
    these layers plus norms, attention and elementwise ops, which are row-independent as
    they are. Idempotent; subclasses (e.g. LoRA-wrapped layers) are left alone.
    """
    classes = _invariant_classes()
    for child in module.modules():
        swap = classes.get(type(child))
        if swap is not None:
            child.__class__ = swap


def row_independent_kernels(device, enabled: bool = True):
    """A context in which PyTorch's CPU convolutions do not choose algorithms by batch size.

    oneDNN picks kernels by batch size and NNPACK takes over from 16 images up; with both
    off, convolutions run PyTorch's per-image kernel. Layers swapped by
    ``make_rows_independent`` do not need it; it covers layers the swap leaves alone.
    """
    import torch

    if str(device) != "cpu" or not enabled:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
    stack.enter_context(torch.backends.nnpack.flags(enabled=False))
    return stack
