"""Remote reward: HTTP server and client on localhost (threads and one subprocess)."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from rewards import MultiReward, RewardError, RewardServer, build_reward, serve_reward  # noqa: E402
from rewards.remote import RemoteReward, decode_request, encode_request  # noqa: E402

P = "plugins.reward_plugins"
PROMPTS = [f"p{i}" for i in range(5)]


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(0))


def test_wire_format_round_trip_without_pickle(images):
    md = [{"i": i, "t": torch.tensor([1.0, 2.0])} for i in range(5)]
    x, p, m = decode_request(encode_request(images, PROMPTS, md, "float32"))
    assert torch.equal(x, images) and p == PROMPTS and m[1] == {"i": 1, "t": [1.0, 2.0]}
    x8, _, _ = decode_request(encode_request(images, PROMPTS, md, "uint8"))
    assert (x8 - images).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="JSON-serialisable"):
        encode_request(images, PROMPTS, [{"x": object()}] * 5)


def test_remote_scores_equal_in_process(images):
    local = build_reward("jpeg_incompressibility")
    with serve_reward("jpeg_incompressibility", port=0, block=False) as server:
        remote = build_reward(
            {
                "name": "remote",
                "batch_size": 2,
                "kwargs": {"url": server.url, "encoding": "float32", "name": "jpeg_remote"},
            }
        )
        out = remote(images, PROMPTS, None)
        assert torch.equal(out.scores, local(images, PROMPTS, None).scores)
        assert out.details[3]["jpeg_kb"] == pytest.approx(out.scores[3].item())
        info = remote.info()
        assert info["name"] == "jpeg_incompressibility" and info["range"] == [0.0, "inf"]
        # uint8 transport is exact for images that already sit on the 8-bit grid.
        q = images.mul(255).round().div(255)
        u8 = RemoteReward(url=server.url, encoding="uint8")(q, PROMPTS, None).scores
        assert torch.equal(u8, local(q, PROMPTS, None).scores)
        # Inside a MultiReward next to a local reward.
        m = MultiReward(
            [
                {"name": "remote", "kwargs": {"url": server.url, "encoding": "float32"}, "label": "r"},
                "jpeg_incompressibility",
            ]
        )(images, PROMPTS, None)
        assert torch.equal(m.rewards[:, 0], m.rewards[:, 1])


def test_remote_reward_error_is_not_retried_and_names_the_reward(images):
    with serve_reward(f"{P}:raising", port=0, block=False) as server:
        client = RemoteReward(url=server.url, retries=5, backoff=10.0)
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"HTTP 422: reward 'raising' raised ValueError: boom"):
            client(images, PROMPTS, None)
        assert time.monotonic() - start < 5.0
    with serve_reward(f"{P}:nan_second", port=0, block=False) as server:
        with pytest.raises(RewardError, match="'nan_second' returned NaN/inf at indices \\[1\\]"):
            RemoteReward(url=server.url)(images, PROMPTS, None)


def test_remote_survives_server_restart_through_retries(images):
    server = serve_reward("jpeg_incompressibility", port=0, block=False)
    port = server.port
    client = RemoteReward(url=server.url, retries=30, backoff=0.1, max_backoff=0.2, encoding="float32")
    first = client(images, PROMPTS, None).scores
    server.stop()
    restarted = {}

    def restart():
        time.sleep(1.0)
        restarted["server"] = RewardServer(build_reward("jpeg_incompressibility"), port=port).start()

    t = threading.Thread(target=restart)
    t.start()
    try:
        start = time.monotonic()
        second = client(images, PROMPTS, None).scores  # server is down: the client retries until it is back
        waited = time.monotonic() - start
        t.join()
        assert torch.equal(first, second) and waited >= 0.8
    finally:
        t.join()
        if "server" in restarted:
            restarted["server"].stop()


def test_remote_gives_up_with_clear_error_when_server_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RemoteReward(url=f"http://127.0.0.1:{port}", retries=2, backoff=0.01)
    with pytest.raises(RewardError, match=rf"at http://127.0.0.1:{port}/score failed after 3 attempt\(s\)"):
        client(torch.rand(1, 3, 8, 8), ["x"], None)


def test_remote_hang_past_timeout_names_the_url(images):
    with serve_reward({"name": f"{P}:slow", "kwargs": {"delay": 3.0}}, port=0, block=False) as server:
        client = build_reward({"name": "remote", "kwargs": {"url": server.url, "timeout": 0.5, "retries": 3}})
        start = time.monotonic()
        with pytest.raises(RewardError, match=rf"{server.url}/score did not answer within timeout=0.5s"):
            client(images, PROMPTS, None)
        assert time.monotonic() - start < 2.5


def test_serve_main_in_a_subprocess(images):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(__file__), os.getcwd(), os.environ.get("PYTHONPATH", "")]
        ),
    )
    code = "import sys; from rewards.remote import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, f"{P}:brightness", "--port", "0", "--kwargs", '{"scale": 2.0}'],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "serving reward 'brightness' at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        out = RemoteReward(url=url, encoding="float32")(images, PROMPTS, None).scores
        assert torch.allclose(out, 2.0 * images.mean(dim=(1, 2, 3)))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_add_serve_reward_parser():
    import argparse

    from rewards import add_serve_reward_parser

    parser = argparse.ArgumentParser(prog="diffalign")
    add_serve_reward_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve-reward", "ocr", "--port", "1234", "--kwargs", '{"backend": "tesseract"}']
    )
    assert args.name == "ocr" and args.port == 1234 and callable(args.func)


class _BadServer:
    """A localhost HTTP server answering every POST with ``body`` (bytes), optionally one byte per ``trickle`` s."""

    def __init__(self, body: bytes, trickle: float = 0.0):
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                try:
                    for i in range(len(outer.body)):
                        self.wfile.write(outer.body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(outer.trickle)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.body, self.trickle = body, trickle
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("body, message", [
    (b"not json", "answered something that is not valid JSON"),
    (b"[1, 2]", "answered a JSON list, expected an object"),
    (b'{"scores": [0.5, NaN]}', "NaN is not valid JSON; send null"),
    (b'{"scores": [0.5, Infinity]}', "Infinity is not valid JSON"),
    (b'{"scores": [true, 0.5]}', r"non-numeric or non-finite scores at indices \[0\] \(first: True\)"),
    (b'{"scores": [[1], "high"]}', r"non-numeric or non-finite scores at indices \[0, 1\]"),
    (b'{"scores": [1e999, 0.5]}', r"non-numeric or non-finite scores at indices \[0\]"),
], ids=["not_json", "list", "nan", "inf", "bool", "nested", "overflow"])
def test_malformed_answers_name_the_reward_and_the_url(body, message):
    server = _BadServer(body)
    try:
        client = RemoteReward(url=server.url, retries=0, timeout=5.0, name="judge")
        with pytest.raises(RewardError, match=rf"remote reward 'judge' at {server.url}.*{message}"):
            client(torch.rand(2, 3, 8, 8), ["a", "b"], None)
    finally:
        server.close()


def test_timeout_bounds_the_whole_answer_not_each_read():
    server = _BadServer(b'{"scores": [0.5, 0.5]}' + b" " * 40, trickle=0.2)  # ~12 s in all, 0.2 s per byte
    try:
        client = RemoteReward(url=server.url, retries=0, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(RewardError, match="did not answer within timeout=1s"):
            client(torch.rand(2, 3, 8, 8), ["a", "b"], None)
        assert time.monotonic() - start < 4.0
    finally:
        server.close()


def test_a_nan_in_details_and_a_plain_function_are_served(images):
    """A reward whose details hold a NaN (a plugin's "not applicable" value) is served with that value as null
    (json.dumps wrote a bare NaN, which the client refuses: the whole answer failed); a plain function given to
    serve_reward is wrapped as build_reward wraps a plugin (every request failed with a 400 on ``.name``)."""
    from diffalign.types import RewardOutput
    from rewards.base import FunctionReward

    def half_applicable(images, prompts, metadata):
        n = images.shape[0]
        scores = torch.tensor([float("nan") if i % 2 == 0 else 0.5 for i in range(n)])
        return RewardOutput(scores=scores, details=[{"raw": float(s), "ok": True} for s in scores])

    half_applicable.allows_nan = True
    reward = FunctionReward(half_applicable, name="half")
    with serve_reward(reward, port=0, block=False) as server:
        out = RemoteReward(url=server.url, encoding="float32")(images, PROMPTS, None)
    assert torch.isnan(out.scores[0]) and float(out.scores[1]) == 0.5
    assert out.details[0] == {"raw": None, "ok": True} and out.details[1] == {"raw": 0.5, "ok": True}

    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    with serve_reward(brightness, port=0, block=False) as server:
        out = RemoteReward(url=server.url, encoding="float32")(images, PROMPTS, None)
    torch.testing.assert_close(out.scores, images.mean(dim=(1, 2, 3)))


def test_a_transient_server_error_is_retried():
    """Only connection errors were tested: a client that gave up on the first 503 (a proxy, a restarting server)
    passed, and would end a long run."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(1)
            code, body = (503, {"error": "busy"}) if len(calls) == 1 else (200, {"scores": [0.5, 0.25]})
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = RemoteReward(url=f"http://127.0.0.1:{server.server_address[1]}", retries=2, backoff=0.01)(
            torch.rand(2, 3, 4, 4), ["a", "b"])
    finally:
        server.shutdown()
        server.server_close()
    assert len(calls) == 2
    torch.testing.assert_close(out.scores, torch.tensor([0.5, 0.25]))


def test_the_client_sends_at_most_batch_size_images_per_request():
    """`batch_size` keeps a request within the server's memory; a client sending the whole batch passed (the scores
    are the same)."""
    sizes = []

    class Recorder:
        name, differentiable, trainable, range, allows_nan = "rec", False, False, (0.0, 1.0), False

        def __call__(self, images, prompts, metadata):
            sizes.append(images.shape[0])
            return images.mean(dim=(1, 2, 3))

    with RewardServer(Recorder()).start() as server:
        out = RemoteReward(url=server.url, batch_size=2, retries=0)(torch.rand(5, 3, 8, 8), ["p"] * 5)
    assert sizes == [2, 2, 1] and out.scores.shape == (5,)
