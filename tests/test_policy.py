"""The tiny ShapesWorld policy: Policy protocol, CFG, LoRA, reference, snapshots, checkpoints."""

import pytest
import torch
from tiny import SMALL, tiny_policy

from diffalign.errors import CheckpointError, ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.models.tiny import TinyFlowPolicy
from diffalign.models.unet import FlowUNet


def make(lora_rank=0, seed=0):
    return tiny_policy(seed, lora_rank)


def test_predict_shapes_and_cfg_formula():
    pol = make()
    x = torch.randn(3, 3, 32, 32)
    cond = pol.encode(["a red circle", "a square", "three green triangles"])
    assert cond.tokens.shape == (3, 16, 384) and cond.pooled.shape == (3, 384)
    with torch.no_grad():
        v_c = pol.predict(x, 0.5, cond)
        v_u = pol.predict(x, 0.5, pol.null_conditioning(3))
        v = pol.predict(x, torch.full((3,), 0.5), cond, guidance_scale=4.5)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert pol.latent_shape(32, 32) == (3, 32, 32)
    with pytest.raises(ConfigError, match="32×32"):
        pol.latent_shape(64, 64)


def test_decode_maps_to_unit_interval():
    img = TinyFlowPolicy.decode(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 5, 1, 1))
    assert img.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("rank", [0, 4])
def test_reference_is_base_and_snapshots_swap(rank):
    pol = make(lora_rank=rank)
    x, cond = torch.randn(2, 3, 32, 32), pol.encode(["a circle", "a square"])
    with torch.no_grad():
        base = pol.predict(x, 0.3, cond)
    trainable = pol.trainable_parameters()
    if rank:
        assert all("lora_" in n for n in pol.trainable_state())
        assert sum(p.numel() for p in trainable) < sum(p.numel() for p in pol.unet.parameters()) / 2
    pol.save_snapshot("old")
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
        moved = pol.predict(x, 0.3, cond)
        assert not torch.allclose(moved, base)
        with pol.reference():
            torch.testing.assert_close(pol.predict(x, 0.3, cond), base)
        with pol.use_snapshot("old"):
            torch.testing.assert_close(pol.predict(x, 0.3, cond), base)
        torch.testing.assert_close(pol.predict(x, 0.3, cond), moved)  # restored after the context
    with pytest.raises(KeyError, match="no snapshot named 'nope'"):
        with pol.use_snapshot("nope"):
            pass


def test_ema_snapshot_formula():
    pol = make()
    pol.save_snapshot("sampler")
    before = {k: v.clone() for k, v in pol.snapshot_state()["sampler"].items()}
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(1.0)
    pol.ema_snapshot("sampler", 0.75)
    cur = pol.trainable_state()
    for k, v in pol.snapshot_state()["sampler"].items():
        torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * cur[k].detach())


def test_lora_merge_save_and_reload_reproduces_predictions(tmp_path):
    pol = make(lora_rank=4)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, cond = torch.randn(2, 3, 32, 32), pol.encode(["a circle", "a blue square"])
    with torch.no_grad():
        want = pol.predict(x, 0.6, cond, guidance_scale=3.0)
    path = pol.save(tmp_path / "merged.safetensors", info={"note": "test"})
    again = TinyFlowPolicy.from_checkpoint(path)
    assert again.info == {"note": "test"}
    with torch.no_grad():
        torch.testing.assert_close(again.predict(x, 0.6, cond, guidance_scale=3.0), want, atol=1e-5, rtol=1e-4)


def test_sampling_weights_run_merged_lora_only_for_gradient_free_adapted_forwards():
    pol = make(lora_rank=4)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        pol.save_snapshot("old")
        for p in pol.trainable_parameters():
            p.mul_(2)
    x, cond = torch.randn(4, 3, 32, 32), pol.encode(["a circle", "a blue square", "two triangles", "a red square"])

    def v():
        return pol.predict(x, 0.6, cond, guidance_scale=3.0)

    with torch.no_grad():
        adapted, base = v(), None
        with pol.reference():
            base = v()
        with pol.use_snapshot("old"):
            old = v()
    with pol.sampling_weights():
        assert pol._merged is not None and not any(p.requires_grad for p in pol._merged.parameters())
        assert not any(n.startswith("_merged") for n in pol.state_dict())  # not a submodule
        with torch.no_grad():
            fast = v()
            with pol.reference():
                fast_base = v()
            with pol.use_snapshot("old"):
                fast_old = v()
        pol.zero_grad()
        v().square().mean().backward()  # with gradients: the adapted UNet, so LoRA weights get them
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in pol.trainable_parameters())
        pol.zero_grad()
    assert pol._merged is None
    assert float((adapted - base).abs().max()) > 1e-2  # the adapters matter
    torch.testing.assert_close(fast, adapted, atol=1e-5, rtol=1e-5)  # merged: same function
    assert torch.equal(fast_base, base) and torch.equal(fast_old, old)  # not merged: the usual path
    with make().sampling_weights():  # full fine-tuning: nothing to merge
        pass


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_unet(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_unet(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a diffalign tiny-model checkpoint"):
        load_unet(other)
    unet = FlowUNet(SMALL)
    p = save_unet(tmp_path / "ok.safetensors", unet, 32)
    sd = {k: v for k, v in unet.state_dict().items() if "conv_out" not in k}
    from safetensors.torch import load_file

    meta_src = p
    from safetensors import safe_open

    with safe_open(str(meta_src), framework="pt") as f:
        meta = f.metadata()
    trunc = tmp_path / "truncated_arch.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(trunc), metadata=meta)
    with pytest.raises(CheckpointError, match="does not match its recorded architecture"):
        load_unet(trunc)
    assert load_file(str(p))  # the good one loads


def test_tiny_policy_satisfies_the_policy_protocol():
    from diffalign.models import Policy
    from diffalign.models.epsilon_view import EpsilonView

    pol = make()
    assert isinstance(pol, Policy) and pol.prediction == "flow"
    assert EpsilonView(pol).prediction == "epsilon"


def test_lora_targets_choose_the_adapted_layers_through_build_policy(tmp_path):
    from diffalign.models.factory import ModelOptions, build_policy

    path = tiny_policy(0).save(tmp_path / "base.safetensors")
    default = build_policy("tiny", path, lora_rank=4)
    attn = build_policy("tiny", path, lora_rank=4, options=ModelOptions(lora_targets=["q", "kv", "out"]))
    names = [n for n, p in attn.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # only attention projections carry adapters: no conv or FiLM LoRA
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q", "kv", "out"}
    n_default = sum(p.numel() for p in default.trainable_parameters())
    n_attn = sum(p.numel() for p in attn.trainable_parameters())
    assert 0 < n_attn < n_default
    with pytest.raises(ConfigError, match=r"match no layer of the ShapesWorld UNet.*layer names end with: .*conv1"):
        build_policy("tiny", path, lora_rank=4, options=ModelOptions(lora_targets=["to_q"]))
