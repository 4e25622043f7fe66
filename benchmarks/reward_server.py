"""Reward-server latency and throughput against calling the reward in-process.

    python benchmarks/reward_server.py --reward jpeg_compressibility --image-size 256 --batch 8 \\
        --clients 1,4,8 --requests 24 [--json out.json]

Starts ``diffalign reward-server`` in a subprocess on a free loopback port, then measures:

- ``in_process``: the reward called directly on a batch (ms per batch);
- ``remote_single``: one client, sequential requests of ``--batch`` images (p50 / p90 ms per
  request: PNG encode + HTTP + decode + reward + JSON);
- ``remote_concurrent``: ``C`` clients sending at once (images/s and mean batch the server
  formed), for each ``C`` in ``--clients``.

Prints JSON and a markdown table. Only loopback traffic; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import torch
from _json_out import emit_json

from diffalign.rewards import build_reward
from diffalign.rewards.remote import RemoteReward

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red circle", "three purple circles",
           'a sign that says "OPEN"']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(reward: str = "jpeg_compressibility", reward_kwargs: dict | None = None, image_size: int = 256,
        batch: int = 8, clients: tuple[int, ...] = (1, 4, 8), requests: int = 24, batch_wait_ms: float = 10.0) -> dict:
    reward_kwargs = reward_kwargs or {}
    g = torch.Generator().manual_seed(0)
    # smooth random images (realistic PNG sizes), on the 8-bit grid
    small = torch.rand(batch, 3, max(2, image_size // 16), max(2, image_size // 16), generator=g)
    images = torch.nn.functional.interpolate(small, size=(image_size, image_size), mode="bilinear").mul(255).round() / 255
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    meta = [{} for _ in prompts]

    local = build_reward(reward, **reward_kwargs)
    local(images, prompts, meta)  # warm-up
    t_local = []
    for _ in range(max(3, requests // 4)):
        t0 = time.perf_counter()
        local(images, prompts, meta)
        t_local.append(1000 * (time.perf_counter() - t0))

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "reward-server", "--reward", reward,
                             "--reward-kwargs", json.dumps(reward_kwargs), "--port", str(port),
                             "--batch-wait-ms", str(batch_wait_ms), "--max-batch-images", str(max(64, batch * 8))],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = RemoteReward(url, budget_s=900, backoff_s=0.2, backoff_max_s=1.0)  # startup: imports torch
        t0 = time.perf_counter()
        client.health()
        startup_s = time.perf_counter() - t0
        client(images, prompts, meta)  # warm-up
        t_remote = []
        for _ in range(requests):
            t0 = time.perf_counter()
            client(images, prompts, meta)
            t_remote.append(1000 * (time.perf_counter() - t0))
        concurrent = []
        for c in clients:
            before = _health(url)
            per_client = max(1, requests // c)
            barrier = threading.Barrier(c)
            errors: list[Exception] = []

            def work(errors=errors, barrier=barrier, per_client=per_client):
                cl = RemoteReward(url, budget_s=120)
                barrier.wait()
                try:
                    for _ in range(per_client):
                        cl(images, prompts, meta)
                except Exception as e:  # noqa: BLE001 - reported in the result
                    errors.append(e)

            threads = [threading.Thread(target=work) for _ in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            dt = time.perf_counter() - t0
            after = _health(url)
            n_batches = after["batches"] - before["batches"]
            concurrent.append({"clients": c, "requests": c * per_client, "images_per_s": c * per_client * batch / dt,
                               "mean_images_per_reward_call": (after["images"] - before["images"]) / max(1, n_batches),
                               "errors": len(errors)})
    finally:
        proc.kill()
        proc.wait(10)
    return {
        "reward": reward, "image_size": image_size, "batch": batch, "batch_wait_ms": batch_wait_ms,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "server_startup_s": startup_s,
        "in_process_ms_per_batch": {"p50": statistics.median(t_local), "p90": _pct(t_local, 0.9)},
        "remote_single_ms_per_request": {"p50": statistics.median(t_remote), "p90": _pct(t_remote, 0.9)},
        "remote_overhead_ms_per_request_p50": statistics.median(t_remote) - statistics.median(t_local),
        "remote_concurrent": concurrent,
    }


def table(r: dict) -> str:
    lines = [f"reward `{r['reward']}`, {r['batch']} images of {r['image_size']}² per request, "
             f"batch wait {r['batch_wait_ms']:g} ms",
             "", "| measure | value |", "| --- | --- |",
             f"| in-process, ms per batch (p50 / p90) | {r['in_process_ms_per_batch']['p50']:.1f} / "
             f"{r['in_process_ms_per_batch']['p90']:.1f} |",
             f"| remote, 1 client, ms per request (p50 / p90) | {r['remote_single_ms_per_request']['p50']:.1f} / "
             f"{r['remote_single_ms_per_request']['p90']:.1f} |",
             f"| remote overhead, ms per request (p50) | {r['remote_overhead_ms_per_request_p50']:.1f} |"]
    for c in r["remote_concurrent"]:
        lines.append(f"| remote, {c['clients']} concurrent clients: images/s (mean images per reward call) | "
                     f"{c['images_per_s']:.1f} ({c['mean_images_per_reward_call']:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reward", default="jpeg_compressibility")
    ap.add_argument("--reward-kwargs", default="{}")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()
    r = run(a.reward, json.loads(a.reward_kwargs), a.image_size, a.batch,
            tuple(int(c) for c in a.clients.split(",")), a.requests, a.batch_wait_ms)
    emit_json(r, a.json)
    print(table(r))


if __name__ == "__main__":
    main()
