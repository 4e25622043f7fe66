"""Pure, batched, stateless sampler steps (with log-probabilities) and schedules."""

from __future__ import annotations

from diffalign.sampling.steps import (
    StepOutput,
    block_coordinates,
    block_noise_step,
    block_project,
    cps_step,
    dance_sde_step,
    ddim_step,
    flow_sde_noise_scale,
    flow_sde_step,
    flow_sigmas,
    gaussian_log_prob,
    ode_step,
    time_shift,
)

__all__ = [
    "StepOutput",
    "block_coordinates",
    "block_noise_step",
    "block_project",
    "cps_step",
    "dance_sde_step",
    "ddim_step",
    "flow_sde_noise_scale",
    "flow_sde_step",
    "flow_sigmas",
    "gaussian_log_prob",
    "ode_step",
    "time_shift",
]
