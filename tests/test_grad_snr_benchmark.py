"""benchmarks/grad_snr.py: the signal-fraction estimator on gradients with a known signal, and a
tiny real run through the trainer's own rollout, reward, advantages and update."""


import pytest
import torch
from tiny import load_benchmark, tiny_unet

from diffalign.models.checkpoint import save_unet


def test_signal_fraction_recovers_a_known_signal():
    """g_k = μ + n_k with |μ|² = 1 and E|n|² = 3: ρ = 1 / (1 + 3) = 0.25, images·(1−ρ)/ρ = 3·images."""
    bench = load_benchmark("grad_snr")
    gen = torch.Generator().manual_seed(0)
    d, k = 40_000, 12
    mu = torch.randn(d, generator=gen, dtype=torch.float64)
    mu /= mu.norm()
    noise = torch.randn(k, d, generator=gen, dtype=torch.float64) * (3 / d) ** 0.5
    out = bench.signal_stats(mu + noise, images=128)
    assert out["signal_fraction"] == pytest.approx(0.25, abs=0.02)
    assert out["batch_for_equal_signal_and_noise"] == pytest.approx(3 * 128, rel=0.1)
    assert all(c == pytest.approx(0.25, abs=0.03) for c in out["pairwise_cosine"])
    pure = bench.signal_stats(noise, images=128)  # no signal: ρ ≈ 0
    assert abs(pure["signal_fraction"]) < 0.02


def test_zero_gradient_columns_and_batches_are_handled():
    bench = load_benchmark("grad_snr")
    g = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    out = bench.signal_stats(g, images=8)
    assert out["live_coordinates"] == 2 and out["coordinates"] == 3
    assert out["pairwise_cosine"] == [pytest.approx(1.0)]  # only the pair of non-zero batches


def test_tiny_real_run(tmp_path, capsys):
    bench = load_benchmark("grad_snr")
    model = str(save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32))
    out = bench.main(["--batches", "2", "--threads", "1", "--set", f"model={model}", "--set", "lora_rank=0",
                      "--set", "prompts_per_epoch=2", "--set", "group_size=4", "--set", "rollout.steps=2",
                      "--set", "rollout.sde_window=null", "--set", "rollout.batch_size=8",
                      "--set", "reward=jpeg_incompressibility", "--set", "reward_kwargs={}"])
    assert out["images_per_batch"] == 8 and len(out["grad_norms"]) == 2
    assert all(n > 0 for n in out["grad_norms"])  # JPEG size always differs within a group
    assert -1 <= out["pairwise_cosine"][0] <= 1
    assert "| signal fraction" in capsys.readouterr().err
