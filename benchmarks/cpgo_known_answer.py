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

Where the pull leads: CPGO's target comes from the rollout policy, which is the policy of the
previous update, so repeated updates iterate ``b_k ← b_{k+1}·α_k(b_k)`` for the slopes of the
gated steps (the last step's target is its own estimate: any slope is a fixed point there). The
fixed point is a flow-map ("consistency") estimate, ``x̂0(x_k) = x_T``. ``fixed_point`` reports
those slopes and the variance of the final sample the unchanged Euler/SDE sampler then draws,
against the data's ``c²`` and the exact model's own sampling variance.

    python benchmarks/cpgo_known_answer.py --json docs/results/claims_round20/cpgo_known_answer.json

Prints JSON and a markdown table. Uses the library's own step functions for ``α_k`` and ``s_k``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _exact_slope(s: float, c: float) -> float:
    """``a(σ) = (1−σ)c²/V(σ)``: the exact clean estimate's slope on ``u``."""
    return (1 - s) * c**2 / _var(s, c)


def _var(s: float, c: float) -> float:
    """``V(σ) = (1−σ)²c² + σ²``: the variance of ``u`` at noise level σ."""
    return (1 - s) ** 2 * c**2 + s**2


def per_step(steps: int = 10, window: tuple[int, int] = (0, 2), noise_level: float = 0.7, m: float = 0.3,
             c: float = 0.5) -> list[dict]:
    from diffalign.sampling import flow_sigmas

    sig = [float(s) for s in flow_sigmas(steps)]
    rows = []
    for k in range(steps):
        s, s1 = sig[k], sig[k + 1]
        sde = window[0] <= k < window[1]
        a = _exact_slope(s, c)
        alpha, std = _step_coeffs(k, a, sig, sde, noise_level, m)
        last = k == steps - 1
        pull = 0.0 if last else 2 * _var(s, c) * (a - _exact_slope(s1, c) * alpha)
        rows.append({"k": k, "sigma": s, "sde": sde, "slope": a, "alpha": alpha, "pull": pull,
                     "relative_pull": None if a == 0 else pull / (2 * _var(s, c) * a),
                     "target_noise_std": 0.0 if last else _exact_slope(s1, c) * std})
    return rows


def _step_coeffs(k: int, b: float, sig: list[float], sde: bool, noise_level: float, m: float) -> tuple[float, float]:
    """``(α_k, s_k)`` of step ``k`` for a model whose clean-estimate slope there is ``b``."""
    from diffalign.sampling import flow_sde_step, ode_step

    s, s1 = sig[k], sig[k + 1]
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1) + (1 - s) * m
    v = (x - (m + b * (x - (1 - s) * m))) / s
    if sde:
        out = flow_sde_step(x, v, s, s1, noise_level, sigma_max=sig[1], noise=torch.zeros_like(x))
        return float(out.mean[1] - out.mean[0]), float(out.std.flatten()[0])
    mean = ode_step(x, v, s, s1)
    return float(mean[1] - mean[0]), 0.0


def fixed_point(steps: int = 10, window: tuple[int, int] = (0, 2), noise_level: float = 0.7, gate: float = 0.6,
                placement: str = "gated", m: float = 0.3, c: float = 0.5, iters: int = 2000) -> dict:
    """CPGO's fixed point on the slopes of the steps it acts on (``gated``: σ_k ≤ gate, any step;
    ``trained``: the SDE steps with σ_k ≤ gate), and the final-sample variance it samples."""
    from diffalign.sampling import flow_sigmas

    sig = [float(s) for s in flow_sigmas(steps)]
    sde = [window[0] <= k < window[1] for k in range(steps)]

    exact = [_exact_slope(s, c) for s in sig[:steps]]
    b = list(exact)
    acts = [k for k in range(steps - 1) if sig[k] <= gate + 1e-6 and (placement == "gated" or sde[k])]

    def final_var(slopes: list[float]) -> float:
        var = 1.0  # u_0 = x_1 ~ N(0, 1)
        for k in range(steps):
            alpha, std = _step_coeffs(k, slopes[k], sig, sde[k], noise_level, m)
            var = alpha**2 * var + std**2
        return var

    exact_var = final_var(b)
    for _ in range(iters):
        b_old = list(b)
        for k in acts:  # the target is the previous policy's estimate one step later
            b[k] = b_old[k + 1] * _step_coeffs(k, b_old[k], sig, sde[k], noise_level, m)[0]
        if max(abs(x - y) for x, y in zip(b, b_old, strict=True)) < 1e-12:
            break
    return {"placement": placement, "gate": gate, "steps_acted_on": acts, "exact_slopes": exact,
            "fixed_point_slopes": b, "data_var": c**2, "exact_model_final_var": exact_var,
            "fixed_point_final_var": final_var(b)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, nargs=2, default=(0, 2), metavar=("START", "END"))
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    rows = per_step(args.steps, tuple(args.window), args.noise_level)
    fps = [fixed_point(args.steps, tuple(args.window), args.noise_level, gate, placement)
           for placement, gate in (("gated", 0.6), ("trained", 1.0))]
    # the authors' own placement: SDE on every step, CPGO on the trained (SDE) steps with σ ≤ 0.6
    fps.append(fixed_point(args.steps, (0, args.steps), args.noise_level, 0.6, "trained") | {"sde_window": [0, args.steps]})
    out = {"data": "x0 ~ N(0.3, 0.5^2) per pixel", "steps": args.steps, "sde_window": list(args.window),
           "noise_level": args.noise_level, "rows": rows, "fixed_points": fps}
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
    print("\n| CPGO placement | steps acted on | fixed-point slopes | final-sample variance (exact model; data c²) |",
          file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for f in fps:
        slopes = ", ".join(f"{f['fixed_point_slopes'][k]:.3f} (exact {f['exact_slopes'][k]:.3f})" for k in f["steps_acted_on"])
        where = f"SDE on steps {f['sde_window'][0]}-{f['sde_window'][1] - 1}, " if "sde_window" in f else ""
        print(f"| {where}{f['placement']}, gate {f['gate']} | {f['steps_acted_on']} | {slopes} | {f['fixed_point_final_var']:.3f} "
              f"({f['exact_model_final_var']:.3f}; {f['data_var']:.3f}) |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
