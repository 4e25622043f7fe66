"""The rollout loop: sample trajectories with log-probabilities, and re-score their steps.

``rollout`` runs a sampler (ALGORITHMS.md §1) from initial noise to clean samples and stores
every state, each transition's log-prob and the rollout policy's clean estimate at each state
(what GRPO-family updates and ConsistentRFT's CPGO need). ``recompute_step`` re-scores stored
transitions under the current parameters, with gradients, for per-sample (shuffled) steps.

Flow samplers (``flow_sde``, ``dance_sde``, ``cps``, ``ode``) step over ``σ_0 = 1 > … > σ_T = 0``
(``flow_sigmas(steps, shift)``) with the policy's velocity ``v̂``; the clean estimate is
``x̂0 = x_k − σ_k·v̂``. ``ddim`` runs on ε-prediction: an ε-policy as it is, a flow policy through
:class:`~diffalign.models.epsilon_view.EpsilonView`; states are then in VP space and
``x̂0 = (x_k − √(1−ᾱ_k)·ε̂)/√ᾱ_k``.

Steps outside ``sde_window`` are deterministic: the Euler ODE step ``x + dt·v̂`` for flow
samplers, DDIM with ``η = 0`` for ``ddim``; their log-prob is 0.

All randomness (initial noise, SDE noise) comes from one ``torch.Generator``; noise is drawn for
the whole batch at once (one initial draw per group and per sample, one SDE draw per step, even
for deterministic steps), so a rollout does not depend on ``batch_size``, and changing one
group's granularity or the SDE window does not change the noise of anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.config import MAX_SEED, ranged
from diffalign.errors import ConfigError
from diffalign.models.base import with_sampling_weights
from diffalign.models.epsilon_view import EpsilonView, ddim_timesteps, flow_sigma_from_alpha_bar
from diffalign.sampling.steps import (
    StepOutput,
    block_noise_step,
    cps_step,
    dance_sde_step,
    ddim_step,
    flow_sde_step,
    flow_sigmas,
    ode_step,
)

__all__ = ["FLOW_SAMPLERS", "SAMPLERS", "RolloutConfig", "Trajectory", "predict_x0", "recompute_step", "rollout"]

FLOW_SAMPLERS = ("flow_sde", "dance_sde", "cps", "ode")
SAMPLERS = (*FLOW_SAMPLERS, "ddim")
IndexLike = Tensor | Sequence[int]


# --------------------------------------------------------------------------- containers


@dataclass
class RolloutConfig:
    """How to sample a rollout. ``B`` = images in the rollout (prompts × images per prompt)."""

    sampler: Literal["flow_sde", "dance_sde", "cps", "ode", "ddim"] = "flow_sde"
    """Step rule: Flow-GRPO SDE, DanceGRPO SDE, coefficients-preserving, Euler ODE (no
    log-probs), or DDIM on an ε-view (DDPO)."""
    steps: int = ranged(10, ge=1)
    """Number of sampling steps ``T`` (model evaluations per image, ×2 with CFG)."""
    shift: float = ranged(1.0, gt=0)
    """Time shift ``s`` of the flow sigmas, ``σ' = s·σ/(1 + (s−1)·σ)`` (1 = none; SD3 uses 3).
    Ignored by ``ddim``, which uses the DDPM schedule's "leading" timesteps."""
    guidance_scale: float = ranged(4.5, ge=0)
    """Classifier-free guidance weight ``w`` in ``v = v_u + w·(v_c − v_u)`` (1 = no CFG)."""
    noise_level: float = ranged(0.7, ge=0)
    """SDE noise: ``a`` for flow_sde / cps (dimensionless), ``η`` for dance_sde / ddim.
    0 makes every step deterministic. Ignored by ``ode``."""
    sde_window: tuple[int, int] | None = ranged(None, ge=0)
    """Steps ``[start, end)`` (0-based step indices) that are stochastic; the others are
    deterministic (ODE / η = 0). None = every step stochastic."""
    init_noise: Literal["independent", "shared"] = "independent"
    """Initial noise ``x_0``: one draw per image ("independent", coarse-grained exploration)
    or one draw per prompt group ("shared", fine-grained; DanceGRPO). ``rollout``'s
    ``shared_groups`` overrides it per group."""
    init_seed: int | None = ranged(None, ge=0, le=MAX_SEED)
    """Diagnostic: draw ``x_0`` from this seed in every rollout call, so each call (each epoch)
    starts from the same initial noises (group ``g`` / image ``i`` gets the seed's ``g``-th /
    ``i``-th draw) while the SDE noise stays fresh. It asks whether the loop can teach the policy to
    pass from a handful of fixed starting points at all (memorisation before generalisation).
    None (default) = drawn from the rollout's generator."""
    noise_pool: int = ranged(1, ge=1)
    """Coarse SDE noise: draw the noise (and apply the SDE's score correction) only along images
    constant on ``noise_pool × noise_pool`` pixel / latent blocks, per channel
    (:func:`~diffalign.sampling.steps.block_noise_step`); the marginals stay the ODE's. 1 = the
    published isotropic SDE. A larger pool leaves fewer noise directions (``C·H·W/pool²``), so the
    policy gradient's noise shrinks while coarse (layout) exploration stays. flow_sde and
    dance_sde only; must divide the latent height and width."""
    antithetic: bool = False
    """Mirrored SDE noise within each group: members 2j and 2j+1 of a group draw ``ε`` and ``−ε``
    at every step (an odd group's last member keeps its own draw). Each sample is still drawn
    from the policy, so the policy gradient stays unbiased; with the group-mean baseline a pair
    contributes ``(A⁺ − A⁻)·ε``, which cancels the part of the reward that is even in the noise."""
    autocast_bf16: bool = False
    """Run model forwards under ``torch.autocast(<device type>, bfloat16)``; sampler math
    (means, stds, log-probs) stays float32."""
    batch_size: int = ranged(64, ge=1)
    """Max images per model call (CFG doubles the forward batch inside ``predict``)."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}; got {self.sampler!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1; got {self.steps}")
        if self.shift <= 0:
            raise ConfigError(f"shift must be > 0 (1 = no shift); got {self.shift}")
        if self.noise_level < 0:
            raise ConfigError(f"noise_level must be >= 0 (it scales the SDE noise); got {self.noise_level}")
        if self.init_noise not in ("independent", "shared"):
            raise ConfigError(f"init_noise must be 'independent' or 'shared'; got {self.init_noise!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.noise_pool < 1:
            raise ConfigError(f"noise_pool must be >= 1 (1 = isotropic SDE noise); got {self.noise_pool}")
        if self.noise_pool > 1 and self.sampler not in ("flow_sde", "dance_sde"):
            raise ConfigError(
                f"noise_pool={self.noise_pool} (coarse SDE noise) applies to the flow_sde and dance_sde "
                f"samplers only; got sampler={self.sampler!r}: set noise_pool=1"
            )
        if self.sde_window is not None:
            start, end = self.sde_window
            if not 0 <= start < end <= self.steps:
                raise ConfigError(
                    f"sde_window=({start}, {end}) must satisfy 0 <= start < end <= steps={self.steps}; "
                    "use None for all steps stochastic"
                )
            self.sde_window = (int(start), int(end))

    def sde_mask(self) -> Tensor:
        """``(T,)`` bool: which steps run the stochastic sampler (all False for ``ode``)."""
        mask = torch.zeros(self.steps, dtype=torch.bool)
        if self.sampler != "ode":
            start, end = self.sde_window or (0, self.steps)
            mask[start:end] = True
        return mask


@dataclass
class Trajectory:
    """A batch of sampled trajectories. ``B`` images, ``T`` steps, latents ``(C, H, W)``.

    Attributes:
        prompts: ``B`` prompts, group-contiguous.
        group_ids: ``(B,)`` long, the prompt group of each sample.
        latents: ``(B, T+1, C, H, W)`` float32 states ``x_0`` (initial noise) … ``x_T`` (final
            sample). VP-space states for ``ddim``.
        log_probs: ``(B, T)`` float32 log-prob of each taken transition ``x_k → x_{k+1}``
            (per-sample mean over dims, constants kept); 0 for deterministic steps.
        x0_pred: ``(B, T, C, H, W)`` float32 rollout policy's clean estimate at ``x_k``:
            ``x_k − σ_k·v̂`` (flow, with the CFG velocity of the step) or
            ``(x_k − √(1−ᾱ_k)·ε̂)/√ᾱ_k`` (ddim).
        sigmas: ``(T+1,)`` float32 flow noise levels ``σ_0 = 1 … σ_T = 0``. For ``ddim``: the
            equivalent rectified-flow ``σ = √(1−ᾱ)/(√ᾱ + √(1−ᾱ))`` of each ``alpha_bars`` entry
            (informational, e.g. for σ gates; the DDIM step itself uses ``alpha_bars``).
        sde_mask: ``(T,)`` bool, steps run with the stochastic sampler. Such a step can still
            have std 0 (noise_level 0, the CPS / DDIM step onto the clean sample): log-prob 0.
        shared_noise: ``(G,)`` bool, whether group ``g`` shared one initial noise; groups are
            indexed by ``torch.unique(group_ids)`` order (see :meth:`group_index`).
        images: ``(B, 3, H, W)`` float32 decoded final samples in [0, 1].
        sampler, noise_level, guidance_scale: the settings needed to re-score steps.
        timesteps: ``(T,)`` long DDPM timesteps (``ddim`` only, else None).
        alpha_bars: ``(T+1,)`` float32 ``ᾱ`` of each state, final = 1 (``ddim`` only, else None).
    """

    prompts: list[str]
    group_ids: Tensor
    latents: Tensor
    log_probs: Tensor
    x0_pred: Tensor
    sigmas: Tensor
    sde_mask: Tensor
    shared_noise: Tensor
    images: Tensor
    sampler: str
    noise_level: float
    guidance_scale: float
    timesteps: Tensor | None = None
    alpha_bars: Tensor | None = None
    noise_pool: int = 1

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """``T``, the number of transitions."""
        return int(self.log_probs.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.shared_noise.shape[0])

    def group_index(self) -> Tensor:
        """``(B,)`` long dense group index in ``[0, G)`` (``torch.unique(group_ids)`` order)."""
        return torch.unique(self.group_ids, return_inverse=True)[1]

    def sample_shared_noise(self) -> Tensor:
        """``(B,)`` bool: whether each sample's group shared its initial noise (for logging)."""
        return self.shared_noise[self.group_index().to(self.shared_noise.device)]

    def next_x0_pred(self) -> Tensor:
        """``(B, T, C, H, W)``: the clean estimate one step later, ``x̂0(x_{k+1})``, with the
        final sample ``x_T`` for the last step (CPGO's target for transition ``k``)."""
        return torch.cat([self.x0_pred[:, 1:], self.latents[:, -1:]], dim=1)

    def to(self, device: torch.device | str) -> Trajectory:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})

    def select(self, idx: IndexLike) -> Trajectory:
        """Sub-trajectory of the samples ``idx`` (long indices or a ``(B,)`` bool mask)."""
        idx = torch.as_tensor(idx, device=self.latents.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long()
        cpu_idx = idx.cpu()
        group_ids = self.group_ids[idx.to(self.group_ids.device)]
        new_index = torch.unique(group_ids, return_inverse=True)[1]
        old_flags = self.sample_shared_noise()[idx.to(self.shared_noise.device)]
        shared = torch.zeros(int(new_index.max()) + 1 if len(idx) else 0, dtype=torch.bool,
                             device=self.shared_noise.device)
        shared[new_index.to(shared.device)] = old_flags
        return replace(
            self,
            prompts=[self.prompts[i] for i in cpu_idx.tolist()],
            group_ids=group_ids,
            latents=self.latents[idx],
            log_probs=self.log_probs[idx],
            x0_pred=self.x0_pred[idx],
            images=self.images[idx.to(self.images.device)],
            shared_noise=shared,
        )


@dataclass
class _Schedule:
    """What a step needs, for rollout and re-scoring alike (tensors on the latents' device)."""

    sampler: str
    noise_level: float
    sigmas: Tensor  # (T+1,)
    sde_mask: Tensor  # (T,) bool
    timesteps: Tensor | None = None  # (T,) long, ddim
    alpha_bars: Tensor | None = None  # (T+1,), ddim
    noise_pool: int = 1

    @staticmethod
    def from_trajectory(traj: Trajectory) -> _Schedule:
        return _Schedule(traj.sampler, traj.noise_level, traj.sigmas, traj.sde_mask, traj.timesteps,
                         traj.alpha_bars, traj.noise_pool)


# --------------------------------------------------------------------------- helpers


def _device(policy: Any) -> torch.device:
    """The device of the policy's first parameter (CPU if it has none)."""
    params = getattr(policy, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _model_for(policy: Any, sampler: str) -> Any:
    """The model the sampler talks to: an ε-view of a flow policy for ``ddim``."""
    prediction = getattr(policy, "prediction", "flow")
    if sampler == "ddim":
        return policy if prediction == "epsilon" else EpsilonView(policy)
    if prediction != "flow":
        raise ConfigError(
            f"sampler {sampler!r} needs a flow (velocity) policy; this policy predicts {prediction!r}: "
            "use sampler='ddim' for ε-prediction models"
        )
    return policy


def _make_schedule(model: Any, config: RolloutConfig, device: torch.device) -> _Schedule:
    mask = config.sde_mask().to(device)
    if config.sampler != "ddim":
        return _Schedule(config.sampler, config.noise_level, flow_sigmas(config.steps, config.shift).to(device), mask,
                         noise_pool=config.noise_pool)
    ac = model.alphas_cumprod
    t, ab, _ = ddim_timesteps(config.steps, int(ac.shape[0]), alphas_cumprod=ac,
                              steps_offset=int(getattr(model, "steps_offset", 0)))
    alpha_bars = torch.cat([ab, torch.ones(1)])
    return _Schedule("ddim", config.noise_level, flow_sigma_from_alpha_bar(alpha_bars).to(device), mask,
                     t.to(device), alpha_bars.to(device))


def _group_index(group_ids: Tensor, batch: int) -> tuple[Tensor, int]:
    """Dense ``(B,)`` group index and ``G``; checks that groups are contiguous."""
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape ({batch},) (one id per prompt); got {tuple(group_ids.shape)}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    runs = 1 + int((group_ids[1:] != group_ids[:-1]).sum()) if batch else 0
    if runs != uniq.numel():
        raise ValueError(
            "prompts must be group-contiguous (each prompt's samples together, e.g. "
            "[p0, p0, p1, p1]); got group_ids " + str(group_ids.tolist())
        )
    return inverse, int(uniq.numel())


def _shared_flags(config: RolloutConfig, shared_groups: Tensor | None, num_groups: int) -> Tensor:
    if shared_groups is None:
        return torch.full((num_groups,), config.init_noise == "shared", dtype=torch.bool)
    flags = torch.as_tensor(shared_groups).cpu()
    if flags.dtype != torch.bool or flags.shape != (num_groups,):
        raise ValueError(
            f"shared_groups must be a bool tensor of shape ({num_groups},) (one flag per group, "
            f"torch.unique(group_ids) order); got dtype {flags.dtype}, shape {tuple(flags.shape)}"
        )
    return flags


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _initial_noise(shape: tuple[int, ...], group_index: Tensor, shared: Tensor, generator: torch.Generator,
                   device: torch.device) -> Tensor:
    """``x_0``: the group's draw where its group is shared, the sample's own draw elsewhere."""
    per_group = _randn((len(shared), *shape), generator, device)
    per_sample = _randn((len(group_index), *shape), generator, device)
    gi = group_index.to(device)
    use_group = shared.to(device)[gi].reshape(-1, *([1] * len(shape)))
    return torch.where(use_group, per_group[gi], per_sample)


def _mirror(noise: Tensor, group_index: Tensor) -> Tensor:
    """Antithetic pairs within each (contiguous) group: odd members take minus the previous draw."""
    gi = group_index.to(noise.device)
    pos = torch.arange(len(gi), device=gi.device)
    first = torch.full((int(gi.max()) + 1,), len(gi), device=gi.device).scatter_reduce(0, gi, pos, "amin")
    odd = ((pos - first[gi]) % 2 == 1).nonzero().flatten()
    out = noise.clone()
    out[odd] = -noise[odd - 1]
    return out


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """``(B,)`` → ``(B, 1, …, 1)`` broadcastable to ``x``."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _model_output(model: Any, sched: _Schedule, x: Tensor, k: Tensor, cond: Any, guidance_scale: float,
                  autocast_bf16: bool) -> Tensor:
    """Velocity (flow) or ε (ddim) at states ``x`` of steps ``k`` ``(B,)``, float32."""
    t = sched.timesteps[k] if sched.sampler == "ddim" else sched.sigmas[k]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        out = model.predict(x, t, cond, guidance_scale=guidance_scale)
    return out.float()


def _x0_estimate(sched: _Schedule, x: Tensor, out: Tensor, k: Tensor) -> Tensor:
    """``x_k − σ_k·v̂`` (flow) or ``(x_k − √(1−ᾱ_k)·ε̂)/√ᾱ_k`` (ddim)."""
    if sched.sampler == "ddim":
        ab = _per_sample(sched.alpha_bars[k], x)
        return (x - torch.sqrt(1 - ab) * out) / torch.sqrt(ab)
    return x - _per_sample(sched.sigmas[k], x) * out


def _deterministic(det: Tensor, prev_sample: Tensor | None) -> StepOutput:
    """A deterministic step: ``x' = μ = det``, std 0, log-prob 0 (attached to the graph, zero grad)."""
    zero = det.reshape(det.shape[0], -1)[:, 0] * 0
    std = torch.zeros(det.shape[0], *([1] * (det.dim() - 1)), device=det.device)
    prev = det if prev_sample is None else prev_sample.float()
    return StepOutput(prev_sample=prev, mean=det, std=std, log_prob=zero)


def _merge(step: StepOutput, det: Tensor, stochastic: Tensor, prev_sample: Tensor | None) -> StepOutput:
    """Per sample: the stochastic step where ``stochastic``, the deterministic ``det`` elsewhere."""
    m = _per_sample(stochastic, det)
    prev = step.prev_sample if prev_sample is not None else torch.where(m, step.prev_sample, det)
    return StepOutput(
        prev_sample=prev,
        mean=torch.where(m, step.mean, det),
        std=torch.where(m, step.std, torch.zeros_like(step.std)),
        log_prob=torch.where(stochastic, step.log_prob, torch.zeros_like(step.log_prob)),
    )


def _transition(sched: _Schedule, x: Tensor, out: Tensor, k: Tensor, *, noise: Tensor | None = None,
                prev_sample: Tensor | None = None) -> StepOutput:
    """One step ``x_k → x_{k+1}`` for per-sample step indices ``k`` ``(B,)``."""
    stochastic = sched.sde_mask[k]
    level = sched.noise_level * stochastic.to(torch.float32)
    if sched.sampler == "ddim":  # η = 0 outside the window is exactly deterministic DDIM
        ab, ab_prev = sched.alpha_bars[k], sched.alpha_bars[k + 1]
        return ddim_step(x, out, ab, ab_prev, level, noise=noise, prev_sample=prev_sample)
    sigma, sigma_next = sched.sigmas[k], sched.sigmas[k + 1]
    det = ode_step(x, out, sigma, sigma_next)
    if sched.sampler == "ode" or not bool(stochastic.any()):
        return _deterministic(det, prev_sample)
    kw = {"noise": noise, "prev_sample": prev_sample}
    if sched.sampler == "flow_sde":
        step = flow_sde_step(x, out, sigma, sigma_next, level, sigma_max=sched.sigmas[1], **kw)
    elif sched.sampler == "dance_sde":
        step = dance_sde_step(x, out, sigma, sigma_next, level, **kw)
    else:
        step = cps_step(x, out, sigma, sigma_next, level, **kw)
    step = block_noise_step(step, det, sched.noise_pool, **kw)
    return step if bool(stochastic.all()) else _merge(step, det, stochastic, prev_sample)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


# --------------------------------------------------------------------------- public API


def _setup(policy: Any, prompts, group_ids, config: RolloutConfig, shared_groups: Tensor | None):
    """What every sampling loop needs first: prompts as a list, group ids on CPU, each
    sample's group index, per-group shared-noise flags, the model for the sampler, its
    device, the sigma schedule and the latent shape."""
    prompts = list(prompts)
    gids = torch.as_tensor(group_ids, dtype=torch.long).cpu()
    group_index, num_groups = _group_index(gids, len(prompts))
    shared = _shared_flags(config, shared_groups, num_groups)
    model = _model_for(policy, config.sampler)
    device = _device(model)
    sched = _make_schedule(model, config, device)
    shape = tuple(model.latent_shape(model.image_size, model.image_size))
    if shape[-1] % config.noise_pool or shape[-2] % config.noise_pool:
        raise ConfigError(f"rollout.noise_pool={config.noise_pool} must divide the latent height and width "
                          f"{tuple(shape[-2:])}: pick a divisor, or 1 for isotropic SDE noise")
    return prompts, gids, group_index, shared, model, device, sched, shape


@torch.no_grad()
@with_sampling_weights
def rollout(
    policy: Any,
    prompts: Sequence[str],
    group_ids: IndexLike,
    config: RolloutConfig,
    *,
    generator: torch.Generator,
    shared_groups: Tensor | None = None,
) -> Trajectory:
    """Sample ``B = len(prompts)`` trajectories with ``config``'s sampler; see the module docstring.

    Args:
        policy: a ``Policy`` (flow; or ε-prediction for ``ddim``).
        prompts: ``B`` prompts, group-contiguous (each prompt's K samples together).
        group_ids: ``(B,)`` integer group (prompt) id per sample.
        config: sampler settings.
        generator: the source of all randomness (initial and SDE noise); may live on CPU
            while the policy runs elsewhere.
        shared_groups: ``(G,)`` bool, per group (``torch.unique(group_ids)`` order): share one
            initial noise (fine-grained) or not (coarse-grained). Overrides
            ``config.init_noise``; this is how ConsistentRFT's DGR mixes granularities.

    Returns:
        a :class:`Trajectory` on the policy's device.
    """
    prompts, gids, group_index, shared, model, device, sched, shape = _setup(
        policy, prompts, group_ids, config, shared_groups)
    b, steps = len(prompts), config.steps

    init_gen = generator if config.init_seed is None else torch.Generator(generator.device).manual_seed(
        config.init_seed)
    x = _initial_noise(shape, group_index, shared, init_gen, device)
    latents = torch.empty(b, steps + 1, *shape, device=device)
    x0_pred = torch.empty(b, steps, *shape, device=device)
    log_probs = torch.zeros(b, steps, device=device)
    latents[:, 0] = x
    chunks = _chunks(b, config.batch_size)
    conds = [model.encode(prompts[c]) for c in chunks]
    for k in range(steps):
        noise = _randn((b, *shape), generator, device)
        if config.antithetic:
            noise = _mirror(noise, group_index)
        ks = torch.full((b,), k, dtype=torch.long, device=device)
        out = torch.cat([
            _model_output(model, sched, x[c], ks[c], cond, config.guidance_scale, config.autocast_bf16)
            for c, cond in zip(chunks, conds, strict=True)
        ])
        x0_pred[:, k] = _x0_estimate(sched, x, out, ks)
        step = _transition(sched, x, out, ks, noise=noise)
        log_probs[:, k] = step.log_prob
        x = latents[:, k + 1] = step.prev_sample
    images = torch.cat([policy.decode(x[c]).float() for c in chunks])
    return Trajectory(
        prompts=prompts, group_ids=gids.to(device), latents=latents, log_probs=log_probs, x0_pred=x0_pred,
        sigmas=sched.sigmas, sde_mask=sched.sde_mask, shared_noise=shared.to(device), images=images,
        sampler=config.sampler, noise_level=float(config.noise_level),
        guidance_scale=float(config.guidance_scale), timesteps=sched.timesteps, alpha_bars=sched.alpha_bars,
        noise_pool=config.noise_pool,
    )


def recompute_step(
    policy: Any,
    traj: Trajectory,
    sample_idx: IndexLike,
    step_idx: IndexLike,
    *,
    cond: Any = None,
    autocast_bf16: bool = False,
) -> tuple[StepOutput, Tensor, Tensor]:
    """Re-score stored transitions ``x_k → x_{k+1}`` under the policy's current parameters.

    Sample ``n`` is trajectory ``sample_idx[n]`` at step ``step_idx[n]`` (each sample its own
    step, e.g. shuffled). Same sampler, noise level, guidance and schedule as the rollout;
    ``traj.latents[i, k+1]`` is scored as ``prev_sample`` from ``traj.latents[i, k]``. Runs
    in the caller's grad mode (enabled for the PPO update; wrap in ``torch.no_grad()`` and
    ``policy.reference()`` for a KL reference). With unchanged parameters (float32, no
    autocast) ``log_prob`` equals ``traj.log_probs[i, k]``: ratio 1.

    Args:
        policy: the same policy object (or ε-view) that made the rollout.
        traj: the rollout.
        sample_idx: ``(N,)`` trajectory indices.
        step_idx: ``(N,)`` step indices in ``[0, T)``.
        cond: conditioning of the ``N`` selected samples (default: ``policy.encode`` of their prompts).
        autocast_bf16: run the model forward under bf16 autocast (sampler math stays float32).

    Returns:
        ``(step, model_out, x0_pred)``: the :class:`StepOutput` (``log_prob`` ``(N,)``, ``mean``,
        ``std``), the velocity (flow) or ε (ddim) ``(N, C, H, W)``, and the clean estimate
        ``x̂0_θ(x_k)`` ``(N, C, H, W)``.
    """
    sched, i, k, x, out = _forward_at(policy, traj, sample_idx, step_idx, cond, autocast_bf16)
    step = _transition(sched, x, out, k, prev_sample=traj.latents[i, k + 1])
    return step, out, _x0_estimate(sched, x, out, k)


def predict_x0(
    policy: Any,
    traj: Trajectory,
    sample_idx: IndexLike,
    step_idx: IndexLike,
    *,
    cond: Any = None,
    autocast_bf16: bool = False,
) -> Tensor:
    """The current policy's clean estimate ``x̂0_θ(x_k)`` at stored states, at any step.

    Unlike :func:`recompute_step` it scores no transition, so ``k`` may be an ODE step (outside
    the SDE window); one model forward, in the caller's grad mode. With unchanged parameters
    (float32, no autocast) it equals ``traj.x0_pred[i, k]``.

    Args:
        policy: the policy (or ε-view) that made the rollout.
        traj: the rollout.
        sample_idx: ``(N,)`` trajectory indices.
        step_idx: ``(N,)`` step indices in ``[0, T)``.
        cond: conditioning of the ``N`` selected samples (default: ``policy.encode`` of their prompts).
        autocast_bf16: run the model forward under bf16 autocast.

    Returns:
        ``(N, C, H, W)`` float32.
    """
    sched, _, k, x, out = _forward_at(policy, traj, sample_idx, step_idx, cond, autocast_bf16)
    return _x0_estimate(sched, x, out, k)


def _forward_at(policy: Any, traj: Trajectory, sample_idx: IndexLike, step_idx: IndexLike, cond: Any,
                autocast_bf16: bool):
    """The model's output at the stored states ``x_k`` of trajectories ``sample_idx``:
    ``(schedule, i, k, x, out)``, indices checked (shared by the re-scoring functions)."""
    device = traj.latents.device
    i = torch.as_tensor(sample_idx, dtype=torch.long, device=device).reshape(-1)
    k = torch.as_tensor(step_idx, dtype=torch.long, device=device).reshape(-1)
    if i.shape != k.shape:
        raise ValueError(f"sample_idx and step_idx must have the same length; got {len(i)} and {len(k)}")
    if len(k) and not (0 <= int(k.min()) and int(k.max()) < traj.num_steps):
        raise ValueError(f"step_idx must lie in [0, {traj.num_steps}); got {k.tolist()}")
    model = _model_for(policy, traj.sampler)
    sched = _Schedule.from_trajectory(traj)
    x = traj.latents[i, k]
    if cond is None:
        cond = model.encode([traj.prompts[j] for j in i.tolist()])
    return sched, i, k, x, _model_output(model, sched, x, k, cond, traj.guidance_scale, autocast_bf16)
