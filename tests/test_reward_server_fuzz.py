"""Fuzz the reward server: generated bodies (random bytes, JSON of every shape and text encoding,
deep nesting, request-shaped objects with odd images, prompts and metadata) POSTed to an
in-process server bound to 127.0.0.1. Every answer must be JSON with a status the server counts
in /health, and the server must stay up. Bounded: a fixed number of examples, small bodies."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffalign.rewards import build_reward
from diffalign.rewards.server import ServerConfig, create_app

HOST = "127.0.0.1"  # loopback only
LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def port():
    import uvicorn

    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(max_request_mb=LIMIT_MB, batch_wait_ms=0, max_images_per_request=6, request_timeout_s=30)
    app = create_app(build_reward("shapes_verifier", mode="partial"), cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield port
    server.should_exit = True
    thread.join(10)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def health(port: int) -> dict:
    status, body = request(port, "GET", "/health")
    assert status == 200
    return json.loads(body)


# --------------------------------------------------------------------------- bodies


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_sides = st.one_of(st.sampled_from([7, 16, 32, 64]), st.integers(1, 80))
_images = st.one_of(
    st.builds(_png, st.one_of(_sides.map(lambda s: (s, s)), st.tuples(_sides, _sides)),
              st.tuples(*[st.integers(0, 255)] * 3)),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),  # not an image
    st.text(max_size=12),  # not base64
    st.integers() | st.none() | st.lists(st.integers(), max_size=2),  # not a string
)
_prompts = st.one_of(st.sampled_from(["a red circle", "two blue squares", "a green triangle above a red circle"]),
                     st.text(max_size=30), st.integers())
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=16)


@st.composite
def _score_request(draw) -> dict:
    n = draw(st.integers(0, 4))
    m = n if draw(st.booleans()) else draw(st.integers(0, 7))  # mostly one prompt per image
    body = {"images": draw(st.lists(_images, min_size=n, max_size=n)),
            "prompts": draw(st.lists(_prompts, min_size=m, max_size=m))}
    if draw(st.booleans()):
        body["metadata"] = draw(st.one_of(st.lists(st.dictionaries(st.text(max_size=4), _json, max_size=2),
                                                   min_size=n, max_size=n), _json))
    return body


@st.composite
def _valid_request(draw) -> dict:
    """Requests the verifier scores: ShapesWorld-sized PNGs and grammar prompts."""
    n, side = draw(st.integers(1, 4)), draw(st.sampled_from([32, 64]))
    colors = draw(st.lists(st.tuples(*[st.integers(0, 255)] * 3), min_size=n, max_size=n))
    prompts = st.sampled_from(["a red circle", "two blue squares", "a green triangle above a red circle"])
    return {"images": [_png((side, side), c) for c in colors],
            "prompts": draw(st.lists(prompts, min_size=n, max_size=n))}


def _encode(value, encoding: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode(encoding, errors="surrogatepass" if "utf" in encoding
                                                                             else "replace")


_encodings = st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32", "latin-1"])
_deep = st.builds(lambda n, opener, closer: opener * n + closer * n,
                  st.integers(1, 20_000), st.sampled_from([b"[", b'{"a":[', b'{"k":']), st.sampled_from([b"]", b"}]", b""]))
BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(_encode, _json, _encodings),
    st.builds(_encode, _score_request(), _encodings),
    st.builds(_encode, _score_request(), st.just("utf-8")),
    st.builds(_encode, _valid_request(), _encodings),
    _deep,
    st.just(b" " * int(LIMIT_MB * 2**20 + 10) + b"{}"),  # over max_request_mb
)


# --------------------------------------------------------------------------- the test


def test_generated_bodies_always_get_a_counted_json_answer(port):
    before, seen = health(port), Counter()
    t0 = time.monotonic()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=BODIES)
    def one(body: bytes) -> None:
        status, raw = request(port, "POST", "/score", body)
        seen[status] += 1
        payload = json.loads(raw)  # every answer is JSON
        assert isinstance(payload, dict), raw[:200]
        if status == 200:
            assert len(payload["scores"]) == len(json.loads(body)["images"])
            return
        assert status in (400, 413, 422, 500), (status, payload)
        assert isinstance(payload["error"], str) and payload["error"], payload
        if status == 500:  # only the reward's own failures (e.g. a prompt it cannot parse), no server bug
            assert payload["error"].startswith("reward '"), payload

    one()
    after = health(port)
    assert after["status"] == "ok"  # still up
    assert sum(seen.values()) >= 300 and time.monotonic() - t0 < 120
    errors = sum(n for status, n in seen.items() if status >= 400)
    assert after["errors"] - before["errors"] == errors  # every 4xx / 5xx answer counted
    assert seen[200] >= 10  # scoring itself was exercised, not only the rejections
    seen[200] += 1  # the first GET /health
    for status, n in seen.items():
        assert after["responses"][str(status)] - before["responses"].get(str(status), 0) == n
