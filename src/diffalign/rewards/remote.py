"""Remote reward: score images with a reward served by ``diffalign reward-server`` elsewhere.

Heavy reward models (PickScore on a GPU box, GenEval detectors, VLM judges) run in their own
process or machine; training sends each rollout chunk over HTTP::

    POST {url}/score   {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}
    200                {"reward": name, "scores": [...], "details": {key: [...]}}

Failures are retried with exponential backoff (connection refused or reset, timeouts, 502,
503, 504, 429) until ``budget_s`` has passed; then the call raises :class:`RewardError`, which
stops the training step. A remote reward never scores 0 in place of an answer. Requests the
server rejects as malformed (4xx) or a reward that fails on the server are not retried.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardError, RewardOutput, register_reward

RETRY_STATUS = {429, 502, 503, 504}


def encode_images(images: torch.Tensor, compress_level: int = 1) -> list[str]:
    """``(B, 3, H, W)`` float images in [0, 1] → base64 PNG strings (8-bit RGB)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W); got {tuple(images.shape)}")
    u8 = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for im in u8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im)).save(buf, format="PNG", compress_level=compress_level)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_image(data: str, max_pixels: int = 4096 * 4096) -> np.ndarray:
    """A base64 PNG (or any format PIL reads) → ``(H, W, 3)`` uint8 RGB. Raises ValueError."""
    if not isinstance(data, str):
        raise ValueError(f"expected a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as e:
        raise ValueError(f"not valid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"image of {im.width}×{im.height} pixels is larger than {max_pixels} pixels")
            return np.asarray(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e


def images_to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """Same-size ``(H, W, 3)`` uint8 arrays → ``(B, 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


class _Fatal(Exception):
    """A failure that retrying cannot fix."""


@register_reward("remote")
class RemoteReward:
    """Client of ``diffalign reward-server``.

    Args:
        url: the server, e.g. ``http://gpu-box:8000``.
        timeout_s: limit of one HTTP attempt (seconds).
        budget_s: total time one call may spend, retries included, before it raises.
        backoff_s: first retry delay; doubled each retry (with up to 50% random jitter).
        backoff_max_s: longest delay between retries.
        max_images_per_request: a larger batch is sent as several requests, in order.
        expect_reward: if set, the server must serve a reward of this name (checked on the
            first call), so a training run cannot silently use the wrong reward.
    """

    def __init__(self, url: str = "", timeout_s: float = 120.0, budget_s: float = 300.0, backoff_s: float = 0.5,
                 backoff_max_s: float = 15.0, max_images_per_request: int = 64, expect_reward: str | None = None):
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError(f"remote reward: url must be http(s)://host:port of a `diffalign reward-server`, "
                              f"got {url!r}")
        if timeout_s <= 0 or budget_s <= 0 or backoff_s <= 0 or max_images_per_request < 1:
            raise ConfigError("remote reward: timeout_s, budget_s, backoff_s and max_images_per_request must be "
                              "positive")
        self.url = url.rstrip("/")
        self.timeout_s, self.budget_s = timeout_s, budget_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.max_images_per_request = max_images_per_request
        self.expect_reward = expect_reward
        self.name = f"remote[{self.url}]"
        self.attempts = 0
        """HTTP attempts made so far (all calls), for logging and tests."""
        self._checked = expect_reward is None

    # -- HTTP ----------------------------------------------------------------------------
    def _attempt(self, path: str, body: bytes | None, timeout: float) -> dict:
        self.attempts += 1
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read() or b"{}")
            except ValueError:
                payload = {}
            msg = payload.get("error") or e.reason
            if e.code in RETRY_STATUS:
                raise ConnectionError(f"HTTP {e.code}: {msg}") from e
            raise _Fatal(f"the server answered HTTP {e.code}: {msg}") from e

    def _request(self, path: str, body: bytes | None) -> dict:
        """One request with retries and exponential backoff inside ``budget_s``."""
        start = time.monotonic()
        delay, tries, seen = self.backoff_s, 0, {}  # error text -> count, in first-seen order
        while True:
            remaining = self.budget_s - (time.monotonic() - start)
            tries += 1
            try:
                return self._attempt(path, body, max(0.05, min(self.timeout_s, remaining)))
            except _Fatal as e:
                raise RewardError(f"reward {self.name!r}: {e}") from e
            except (OSError, ConnectionError, TimeoutError, ValueError) as e:  # refused, reset, timeout, bad JSON
                text = str(e) if isinstance(e, ConnectionError) and str(e).startswith("HTTP ") else \
                    f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
                seen[text[:300]] = seen.get(text[:300], 0) + 1
            sleep = min(delay, self.backoff_max_s) * (0.5 + 0.5 * random.random())
            elapsed = time.monotonic() - start
            if elapsed + sleep >= self.budget_s:
                raise RewardError(
                    f"reward {self.name!r}: no answer after {tries} attempt(s) over {elapsed:.1f} s "
                    f"(budget_s={self.budget_s:g}); errors: "
                    + "; ".join(f"{t} (x{n})" for t, n in seen.items())
                    + ". Is the server running and reachable? "
                    f"Start it with `diffalign reward-server --reward NAME --host 0.0.0.0 --port PORT`, check "
                    f"`curl {self.url}/health`, or raise reward_kwargs.budget_s."
                )
            time.sleep(sleep)
            delay *= 2

    def health(self) -> dict:
        """The server's ``/health`` answer (retried like a scoring call)."""
        return self._request("/health", None)

    # -- Reward protocol -------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        if not self._checked:
            served = self.health().get("reward")
            if served != self.expect_reward:
                raise RewardError(f"reward {self.name!r} serves {served!r}, but expect_reward={self.expect_reward!r}; "
                                  f"point url at the right server or fix expect_reward")
            self._checked = True
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        scores, details = [], []
        n = self.max_images_per_request
        for s in range(0, len(prompts), n):
            body = json.dumps({"images": encode_images(images[s : s + n]), "prompts": list(prompts[s : s + n]),
                               "metadata": metadata[s : s + n]}).encode()
            out = self._request("/score", body)
            got = out.get("scores")
            if not isinstance(got, list) or len(got) != len(prompts[s : s + n]):
                raise RewardError(f"reward {self.name!r}: the server returned {got!r:.200} for "
                                  f"{len(prompts[s : s + n])} images; expected one score per image")
            scores.append(torch.tensor(got, dtype=torch.float32))
            details.append({k: torch.tensor(v, dtype=torch.float32) for k, v in (out.get("details") or {}).items()})
        keys = set(details[0]).intersection(*details[1:]) if details else set()
        return RewardOutput(torch.cat(scores) if scores else torch.zeros(0),
                            {k: torch.cat([d[k] for d in details]) for k in sorted(keys)})
