"""diffalign.runtime: keeping freed memory for reuse, and the UNet's channels-last activations."""

import subprocess
import sys
import textwrap

import pytest
import torch

from diffalign.models.unet import FlowUNet, UNetConfig
from diffalign.runtime import keep_freed_memory

# Allocate and free a 64 MiB buffer 20 times, touching every page; print the minor page faults.
_CHURN = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from diffalign.runtime import keep_freed_memory
        assert keep_freed_memory()
    torch.ones(16 << 20)  # warm-up: the first touch of the memory faults either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(16 << 20)  # 64 MiB of float32
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    pages = 20 * (64 << 20) // 4096
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2  # every large buffer was a fresh mmap whose pages fault in
    assert kept < default // 2  # freed memory is mostly reused (measured: 82k-115k of 328k faults)
    assert keep_freed_memory() and keep_freed_memory()  # idempotent


def test_keep_freed_memory_rejects_a_threshold_outside_a_c_int():
    with pytest.raises(ValueError, match="threshold_bytes"):
        keep_freed_memory(2**31)
    with pytest.raises(ValueError, match="threshold_bytes"):
        keep_freed_memory(0)


def test_unet_runs_channels_last_and_returns_a_contiguous_tensor():
    torch.manual_seed(0)
    unet = FlowUNet(UNetConfig(channels=(8, 16), attn_levels=(1,), emb_dim=32, heads=2, text_dim=16, groups=4))
    for p in unet.parameters():  # the output conv starts at zero; make every layer matter
        torch.nn.init.normal_(p, std=0.2)
    x, sigma = torch.randn(3, 3, 8, 8), torch.rand(3)
    tokens, mask, pooled = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 16)
    with torch.no_grad():
        out = unet(x, sigma, tokens, mask, pooled)
        # a channels-last input gives the same function, and each sample is independent of the batch
        out_cl = unet(x.contiguous(memory_format=torch.channels_last), sigma, tokens, mask, pooled)
        first = unet(x[:1], sigma[:1], tokens[:1], mask[:1], pooled[:1])
    assert out.is_contiguous() and out.shape == x.shape
    assert float(out.abs().mean()) > 1e-3
    torch.testing.assert_close(out_cl, out)
    torch.testing.assert_close(first, out[:1], atol=1e-5, rtol=1e-5)
