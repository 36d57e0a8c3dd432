"""sdbatch.rows: swapped layers give each row the result it gets alone, for any row count."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sdbatch import rows  # noqa: E402

ROW_COUNTS = (1, 2, 3, 5, 8, 16, 17, 24)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _alone_equals_together(layer, inputs) -> list[int]:
    """Row counts at which some row differs from the same row computed alone."""
    with torch.inference_mode():
        alone = torch.cat([layer(inputs[i:i + 1]) for i in range(len(inputs))])
        return [count for count in ROW_COUNTS if not torch.equal(layer(inputs[:count]), alone[:count])]


def test_linear_rows_are_independent_for_2d_and_3d_inputs():
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 64)
    plain = _alone_equals_together(layer, torch.randn(24, 96))
    rows.make_rows_independent(layer)
    assert type(layer).__name__ == "RowIndependentLinear"
    assert _alone_equals_together(layer, torch.randn(24, 96)) == []
    assert _alone_equals_together(layer, torch.randn(24, 7, 96)) == []  # (batch, tokens, features)
    assert plain  # the plain layer does differ (MKL's few-row path): the swap is what fixes it


@pytest.fixture(params=["onednn", "gemm"])
def conv_path(request, monkeypatch):
    """Both convolution paths: direct oneDNN (the default on CPU) and im2col GEMMs (without oneDNN)."""
    if request.param == "gemm":
        monkeypatch.setattr(rows, "onednn_fits", lambda x: False)
    elif not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    return request.param


@pytest.mark.parametrize("shape", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                   dict(kernel_size=1), dict(kernel_size=2, stride=2)])
def test_conv2d_rows_are_independent_and_match_pytorch(shape, conv_path):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(16, 24, **shape)
    inputs = torch.randn(24, 16, 6, 6)
    with torch.inference_mode():
        expected = layer(inputs)
    rows.make_rows_independent(layer)
    assert _alone_equals_together(layer, inputs) == []
    with torch.inference_mode():
        assert torch.allclose(layer(inputs), expected, atol=1e-5)


def test_large_convolutions_go_in_bands_with_the_same_results(monkeypatch):
    monkeypatch.setattr(rows, "onednn_fits", lambda x: False)  # the GEMM path's bands
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(8, 8, 3, padding=1)
    rows.make_rows_independent(layer)
    inputs = torch.randn(3, 8, 20, 20)
    with torch.inference_mode():
        whole = layer(inputs)
        monkeypatch.setattr(rows, "PATCH_BYTES", 20 * 72 * 4 * 3)  # three output rows per GEMM
        assert torch.equal(layer(inputs), whole)


def test_swap_is_generic_and_leaves_subclasses_and_other_convs_alone():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    block = Block()
    rows.make_rows_independent(block)
    rows.make_rows_independent(block)  # idempotent
    assert type(block.proj).__name__ == "RowIndependentLinear"
    assert type(block.conv).__name__ == "RowIndependentConv2d"
    assert type(block.attention.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    inputs = torch.randn(5, 8, 4, 4)
    with torch.inference_mode():  # a grouped convolution runs PyTorch's per-image kernel, oneDNN off
        assert torch.equal(block.depthwise(inputs)[2:3], block.depthwise(inputs[2:3]))
        assert torch.allclose(block.depthwise(inputs),
                              torch.nn.functional.conv2d(inputs, block.depthwise.weight, block.depthwise.bias,
                                                         padding=1, groups=8), atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("channels, size", [(4, 16), (32, 16), (64, 8), (128, 4), (320, 8)])
def test_direct_kernels_give_each_image_its_own_bits_at_any_batch_size_position_and_thread_count(channels, size,
                                                                                                 kernel, threads):
    # The premise of the direct path, checked on the machine that runs the suite: the same image
    # at the start or the end of batches of 1 to 24 images gets the bits it gets alone (3x3:
    # oneDNN; 1x1: PyTorch's per-image GEMM).
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    torch.set_num_threads(threads)
    torch.manual_seed(channels)
    layer = torch.nn.Conv2d(channels, 64, kernel, padding=kernel // 2)
    rows.make_rows_independent(layer)
    pool = torch.randn(24, channels, size, size)
    with torch.inference_mode():
        alone = layer(pool[:1])
        for count in ROW_COUNTS:
            assert torch.equal(layer(pool[:count])[:1], alone), count
            assert torch.equal(layer(torch.cat([pool[1:count], pool[:1]]))[-1:], alone), count


def test_a_channels_last_input_gets_the_bits_of_a_contiguous_one():
    # oneDNN picks other kernels for channels-last tensors: the layer fixes the format by its weight.
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(16, 16, 3, padding=1)
    rows.make_rows_independent(layer)
    inputs = torch.randn(3, 16, 8, 8)
    with torch.inference_mode():
        assert torch.equal(layer(inputs.contiguous(memory_format=torch.channels_last)), layer(inputs))


def test_one_image_through_a_pointwise_convolution_matches_the_batch(conv_path):
    # One image's 1x1 patches are a column-major view; the batch's are copied row-major.
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 4, 1)  # a VAE's post_quant_conv
    rows.make_rows_independent(layer)
    inputs = torch.randn(8, 4, 8, 8)
    with torch.inference_mode():
        assert torch.equal(layer(inputs)[:1], layer(inputs[:1]))
