"""The reward server (`diffalign reward-server`, uvicorn in a subprocess) and the remote client:
concurrent clients, batching, a server killed mid-run, oversized / malformed requests."""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image
from tiny import tiny_unet

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.models.checkpoint import save_unet
from diffalign.rewards import RewardError, RewardOutput, build_reward, checked_call, register_reward
from diffalign.rewards.remote import RemoteReward, encode_images
from diffalign.rewards.server import ServerConfig, create_app
from diffalign.training.rundir import load_checkpoint
from diffalign.training.trainer import TrainConfig, Trainer

MULTI = {"rewards": {"jpeg_compressibility": {"weight": 2.0},
                     "verifier": {"reward": "shapes_verifier", "kwargs": {"mode": "partial"}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "diffalign.cli", "reward-server", "--port", str(port), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 600.0) -> dict:
    """Poll /health (generous timeout: importing torch on a loaded 2-core machine can take minutes)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start_server(port, "--reward", "multi", "--reward-kwargs", json.dumps(MULTI), "--batch-wait-ms", "150",
                        "--max-request-mb", "1", "--max-images-per-request", "16")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        yield url
    finally:
        stop(proc)


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def u8_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random images on the 8-bit grid, so the PNG round trip is exact."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float() / 255


PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red circle", "a yellow square"]


def test_concurrent_clients_get_the_in_process_scores(server):
    local = build_reward("multi", **MULTI)
    before = health(server)
    jobs = [(u8_images(4, 32 if i % 3 else 64, seed=i), PROMPTS) for i in range(8)]
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def client(i):
        try:
            barrier.wait()
            results[i] = checked_call(RemoteReward(server, expect_reward=health(server)["reward"]), jobs[i][0],
                                      jobs[i][1], [{}] * 4)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (images, prompts), got in zip(jobs, results, strict=True):
        want = local(images, prompts, [{}] * 4)
        torch.testing.assert_close(got.scores, want.scores)
        assert set(got.details) == set(want.details)
        torch.testing.assert_close(got.details["verifier/partial"], want.details["verifier/partial"])
    after = health(server)
    assert after["requests"] - before["requests"] >= len(jobs)
    assert after["max_requests_per_batch"] >= 2  # concurrent requests were merged into one reward call
    assert after["batches"] - before["batches"] < len(jobs)


def test_client_splits_large_batches_into_requests(server):
    images = u8_images(10, 32, seed=99)
    client = RemoteReward(server, max_images_per_request=4)
    got = client(images, PROMPTS * 2 + PROMPTS[:2], [{}] * 10)
    want = build_reward("multi", **MULTI)(images, PROMPTS * 2 + PROMPTS[:2], [{}] * 10)
    torch.testing.assert_close(got.scores, want.scores)
    assert client.attempts == 3  # 4 + 4 + 2 images


def png64(h=16, w=16) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (json.dumps({"prompts": ["a red circle"]}).encode(), 422, "'images'"),
    (json.dumps({"images": [], "prompts": []}).encode(), 422, "empty"),
    (json.dumps({"images": [png64()], "prompts": ["a", "b"]}).encode(), 422, "1 images but 2 prompts"),
    (json.dumps({"images": ["%%%"], "prompts": ["a red circle"]}).encode(), 422, r"images\[0\]: not valid base64"),
    (json.dumps({"images": [base64.b64encode(b"GIF89a-junk").decode()], "prompts": ["x"]}).encode(), 422,
     "not a readable image"),
    (json.dumps({"images": [png64(), png64(8, 8)], "prompts": ["a", "b"]}).encode(), 422, "share one size"),
    (json.dumps({"images": [png64()], "prompts": [3]}).encode(), 422, "must be a string"),
    (json.dumps({"images": [png64()], "prompts": ["a red circle"], "metadata": {"a": 1}}).encode(), 422, "metadata"),
    (json.dumps({"images": [png64()] * 17, "prompts": ["a red circle"] * 17}).encode(), 413, "limit is 16"),
    (json.dumps({"images": [png64()], "prompts": ["x" * (3 * 2**20 // 2)]}).encode(), 413, "exceeds max_request_mb=1"),
    # parser failures: nesting depth, text encodings, huge integers
    (b"[" * 5000 + b"]" * 5000, 400, "nests JSON arrays / objects too deeply"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "too deeply"),
    (b'{"images": ["\xff\xfe"]}', 400, "not valid JSON.*UnicodeDecodeError"),
    ("\ufeff{}".encode("utf-16-le")[:-1], 400, "not valid JSON"),
    (b'{"images": [' + b"9" * 5000 + b"]}", 400, "not valid JSON"),
    # the reward's declared input size (multi of jpeg and the verifier: ShapesWorld's 32 or 64)
    (json.dumps({"images": [png64(7, 7)], "prompts": ["a red circle"]}).encode(), 422,
     r"takes \(B, 3, S, S\) images of 32×32 or 64×64 pixels; got shape \(1, 3, 7, 7\)"),
], ids=lambda v: None if isinstance(v, bytes) else str(v)[:40])
def test_malformed_and_oversized_requests_get_4xx(server, body, status, needle):
    before = health(server)
    code, payload = post(server, body)
    assert code == status, payload
    assert payload["error"] and re.search(needle, payload["error"]), payload
    after = health(server)
    assert after["status"] == "ok"  # the server keeps serving
    assert after["errors"] == before["errors"] + 1  # and counts the answer
    assert after["responses"][str(status)] == before["responses"].get(str(status), 0) + 1


def test_unknown_paths_and_methods_answer_json(server):
    for method, path, status in [("GET", "/nope", 404), ("GET", "/score", 405), ("POST", "/health", 405)]:
        req = urllib.request.Request(server + path, data=b"{}" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == status and "POST /score" in json.loads(e.value.read())["error"]
    assert health(server)["input_sizes"] == [32, 64]


def test_verifier_rejects_images_of_another_size():
    verifier = build_reward("shapes_verifier")
    with pytest.raises(ValueError, match=r"'shapes_verifier\[partial\]' takes .* 32×32 or 64×64 pixels; got shape "
                                         r"\(2, 3, 7, 7\)"):
        verifier(torch.rand(2, 3, 7, 7), ["a red circle"] * 2, [{}] * 2)
    with pytest.raises(RewardError, match="32×32 or 64×64"):  # training and evaluation: checked_call
        checked_call(verifier, torch.rand(1, 3, 48, 48), ["a red circle"], [{}])
    assert checked_call(verifier, torch.ones(1, 3, 64, 64), ["a red circle"], [{}]).scores.shape == (1,)


def test_client_does_not_retry_requests_the_server_rejects(server):
    client = RemoteReward(server, budget_s=30)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match="HTTP 413.*limit is 16"):
        RemoteReward(server, max_images_per_request=32)(u8_images(17, 8, 0), ["a red circle"] * 17, [{}] * 17)
    # a prompt the reward itself rejects: the server answers 422 naming the reward and the prompt error; no retry
    with pytest.raises(RewardError, match=r"HTTP 422: reward 'multi.*part 'verifier'.*PromptError"):
        checked_call(client, u8_images(1, 32, 0), ["hello world"], [{}])
    assert client.attempts == 1 and time.monotonic() - t0 < 20
    with pytest.raises(RewardError, match="serves 'multi"):
        RemoteReward(server, expect_reward="pickscore")(u8_images(1, 16, 0), ["a red circle"], [{}])


def test_a_failing_request_does_not_fail_the_requests_batched_with_it(server):
    out = {}

    def send(key, prompt):
        out[key] = post(server, json.dumps({"images": encode_images(u8_images(2, 32, 5)),
                                            "prompts": [prompt, prompt]}).encode())

    threads = [threading.Thread(target=send, args=(k, p)) for k, p in
               [("good1", "a red circle"), ("bad", "not a shapes prompt"), ("good2", "two blue squares")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out["good1"][0] == 200 and out["good2"][0] == 200 and len(out["good1"][1]["scores"]) == 2
    assert out["bad"][0] == 422 and "PromptError" in out["bad"][1]["error"]


def test_killed_server_client_retries_then_fails_clearly_and_recovers_on_restart():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, "--reward", "jpeg_compressibility")
    try:
        wait_healthy(proc, url)
        images = u8_images(3, 32, 7)
        want = build_reward("jpeg_compressibility")(images, PROMPTS[:3], [{}] * 3).scores
        client = RemoteReward(url, budget_s=600.0, backoff_s=0.1)
        torch.testing.assert_close(client(images, PROMPTS[:3], [{}] * 3).scores, want)
        stop(proc)  # SIGKILL: the process dies mid-run, no graceful shutdown
        client.budget_s = 2.0
        n0, t0 = client.attempts, time.monotonic()
        with pytest.raises(RewardError, match=r"no answer after \d+ attempt\(s\) over .*budget_s=2.*reward-server"):
            checked_call(client, images, PROMPTS[:3], [{}] * 3)
        assert client.attempts - n0 >= 2  # retried with backoff (0.1, 0.2, 0.4, ... s)
        assert time.monotonic() - t0 < 2.0 + 30  # gave up after its budget (slack for a loaded machine)
        # a restarted server is picked up by a client still retrying inside its budget
        patient = RemoteReward(url, budget_s=600.0, backoff_s=0.2, backoff_max_s=1.0)
        proc = start_server(port, "--reward", "jpeg_compressibility")
        torch.testing.assert_close(patient(images, PROMPTS[:3], [{}] * 3).scores, want)
        assert patient.attempts >= 2
    finally:
        stop(proc)


class _KillServer:
    """Scores through the remote client and SIGKILLs the server after its first answer."""

    name = "test_remote_then_kill"
    proc: subprocess.Popen | None = None

    def __init__(self, url: str):
        self.inner = RemoteReward(url, budget_s=600.0, backoff_s=0.1)

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        out = self.inner(images, prompts, metadata)
        stop(type(self).proc)
        self.inner.budget_s = 2.0  # from now on: give up after 2 s of retries
        return out


register_reward("test_remote_then_kill")(_KillServer)


def test_training_fails_the_step_when_the_server_dies_mid_run(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    _KillServer.proc = start_server(port, "--reward", "jpeg_incompressibility")
    try:
        wait_healthy(_KillServer.proc, url)
        model = str(save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32))
        cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
            f"model={model}", "lora_rank=0", "epochs=3", "prompts_per_epoch=2", "group_size=4", "rollout.steps=3",
            "rollout.sde_window=null", "eval.num_images=4", "eval.steps=2", "eval.every=0", "ckpt_every=1",
            "grpo.minibatch_size=8", "grpo.clip_range=0.2", "reward=test_remote_then_kill", "async_reward=false"])
        cfg.reward_kwargs = {"url": url}
        with pytest.raises(RewardError, match=rf"remote\[{url}\].*no answer after"):
            Trainer(cfg, tmp_path / "run").train()
        assert load_checkpoint(tmp_path / "run")["epoch"] == 1  # epoch 1 was scored remotely and trained
    finally:
        stop(_KillServer.proc)


# -- in-process server (uvicorn in a thread) for the timeout ------------------------------------


class _Slow:
    name = "slow"

    def __call__(self, images, prompts, metadata):
        time.sleep(1.0)
        return RewardOutput(torch.zeros(len(prompts)))


def test_slow_reward_times_out_with_504_and_the_client_gives_up():
    import uvicorn

    port = free_port()
    app = create_app(_Slow(), ServerConfig(request_timeout_s=0.2, batch_wait_ms=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while not server.started and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        code, payload = post(url, json.dumps({"images": [png64()], "prompts": ["x"]}).encode())
        assert code == 504 and "request_timeout_s=0.2" in payload["error"]
        client = RemoteReward(url, budget_s=3.0, backoff_s=0.1)
        with pytest.raises(RewardError, match="HTTP 504"):
            client(u8_images(1, 16, 0), ["x"], [{}])
        assert client.attempts >= 2  # 504 is retried until the budget runs out
        assert health(url)["timeouts"] >= 2
    finally:
        server.should_exit = True
        thread.join(10)


def test_cli_reward_server_errors_are_one_line(capsys):
    assert main(["reward-server", "--reward", "no_such_reward", "--port", "1"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "ocr", "--reward-kwargs", "{bad"]) == 2
    assert "--reward-kwargs must be a JSON object" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "remote"]) == 2
    with pytest.raises(Exception, match="url must be"):
        RemoteReward("localhost:8000")
