"""CPGO's pull on an exact model, per step, in closed form (Gaussian data; tests/test_cpgo_placement.py).

For data ``x0 ~ N(m, c²I)`` the exact clean estimate is ``x̂0(x, σ) = m + a(σ)·u``, ``u = x − (1−σ)m``,
``a(σ) = (1−σ)c²/V(σ)``, ``V(σ) = (1−σ)²c² + σ²``. Every sampler step is linear in ``u``:
``u_{k+1} = α_k·u_k + s_k·ε``. For CPGO's ``mse`` distance, the expected gradient of
``mean_d (x̂0_θ(x_k) − x̂0(x_{k+1}))²`` on a slope offset ``δ_k`` (``x̂0_θ = m + (a_k + δ_k)·u``) at the
exact model (``δ = 0``) is::

    pull_k = 2·V_k·(a_k − a_{k+1}·α_k)            (the last step's target is x_T = x̂0(x_{T−1}): 0)

zero only where the clean estimate is a martingale along the sampler. Relative to the slope's own
size, ``pull_k / (2·V_k·a_k)`` says how far CPGO would move the exact model per unit of λ·lr; at
``σ = 1`` the exact slope is 0 (the estimate is the data mean), so any pull makes the prediction
copy the initial noise. At an SDE step the target also carries ``a_{k+1}·s_k·ε``, the step's
injected noise (zero mean; per-sample gradient noise), reported as ``target_noise_std``.

    python benchmarks/cpgo_known_answer.py --json docs/results/claims_round20/cpgo_known_answer.json

Prints JSON and a markdown table. Uses the library's own step functions for ``α_k`` and ``s_k``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def per_step(steps: int = 10, window: tuple[int, int] = (0, 2), noise_level: float = 0.7, m: float = 0.3,
             c: float = 0.5) -> list[dict]:
    from diffalign.sampling import flow_sde_step, flow_sigmas, ode_step

    sig = [float(s) for s in flow_sigmas(steps)]

    def a(s: float) -> float:
        return (1 - s) * c**2 / ((1 - s) ** 2 * c**2 + s**2)

    def var(s: float) -> float:
        return (1 - s) ** 2 * c**2 + s**2

    rows = []
    for k in range(steps):
        s, s1 = sig[k], sig[k + 1]
        sde = window[0] <= k < window[1]
        x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1) + (1 - s) * m
        v = (x - (m + a(s) * (x - (1 - s) * m))) / s
        if sde:
            out = flow_sde_step(x, v, s, s1, noise_level, sigma_max=sig[1], noise=torch.zeros_like(x))
            mean, std = out.mean, float(out.std.flatten()[0])
        else:
            mean, std = ode_step(x, v, s, s1), 0.0
        alpha = float(mean[1] - mean[0])
        last = k == steps - 1
        pull = 0.0 if last else 2 * var(s) * (a(s) - a(s1) * alpha)
        rows.append({"k": k, "sigma": s, "sde": sde, "slope": a(s), "alpha": alpha, "pull": pull,
                     "relative_pull": None if a(s) == 0 else pull / (2 * var(s) * a(s)),
                     "target_noise_std": 0.0 if last else a(s1) * std})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, nargs=2, default=(0, 2), metavar=("START", "END"))
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    rows = per_step(args.steps, tuple(args.window), args.noise_level)
    out = {"data": "x0 ~ N(0.3, 0.5^2) per pixel", "steps": args.steps, "sde_window": list(args.window),
           "noise_level": args.noise_level, "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print("\n| k | σ_k | SDE | exact slope a_k | α_k | pull (per λ) | pull / slope | target noise std |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        rel = "∞ (slope 0)" if r["relative_pull"] is None else f"{r['relative_pull']:+.3f}"
        print(f"| {r['k']} | {r['sigma']:.1f} | {'yes' if r['sde'] else 'no'} | {r['slope']:.3f} | {r['alpha']:.3f} | "
              f"{r['pull']:+.4f} | {rel} | {r['target_noise_std']:.3f} |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
