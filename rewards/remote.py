"""Remote rewards: host any reward behind HTTP, and score through it from the trainer.

Why: reward models often need dependencies (or GPUs) that clash with the trainer's environment; Flow-GRPO
and ddpo-pytorch run them as separate servers. This module uses only the standard library (``http.server``,
``urllib``) and a safe wire format -- never pickle:

* request: ``POST /score`` with an ``.npz`` body written by ``numpy.savez`` holding ``images``
  (``[B, 3, H, W]``, ``uint8`` (default, what an image file holds) or ``float32`` (bit-exact)) and ``request``
  (a uint8 array of UTF-8 JSON ``{"prompts": [...], "metadata": [...]}``); read with ``allow_pickle=False``.
* response: JSON ``{"scores": [float | null, ...], "details": [...] | null, "name": ...}`` (null = NaN).
  Errors: 400 malformed request, 422 the reward failed or returned something invalid (not retried: it would
  fail again), 500 server bug. ``GET /info`` describes the hosted reward, ``GET /health`` answers ``ok``.

The server validates what the hosted reward returns (shape ``[B]``, no inf, NaN only if the reward declares
``allows_nan``), so the client accepts NaN. The client splits batches (``batch_size``), retries connection
errors and 5xx answers with exponential backoff (``retries``, ``backoff``, ``max_backoff``), and fails with an
error naming the URL when the server does not answer within ``timeout`` seconds.

Command line (wired by the CLI as ``diffalign serve-reward``)::

    diffalign serve-reward ocr --port 18090 --kwargs '{"backend": "tesseract"}'
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from diffalign.types import RewardOutput
from rewards.base import FunctionReward, RewardError, as_reward_output, check_inputs, describe_batch
from rewards.registry import RewardSpec, build_reward, get_factory, register_reward

__all__ = [
    "RemoteReward",
    "RewardServer",
    "serve_reward",
    "serve_main",
    "main",
    "add_serve_reward_parser",
    "encode_request",
    "decode_request",
    "ENCODINGS",
]

ENCODINGS = ("uint8", "float32")
_RETRY_STATUS = (500, 502, 503, 504)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _finite_or_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)


def encode_request(
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    encoding: str = "uint8",
) -> bytes:
    """Serialise one request to ``.npz`` bytes (no pickle anywhere)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"remote reward: encoding={encoding!r} is not valid; use one of {list(ENCODINGS)}")
    x = images.detach().float().cpu()
    if encoding == "uint8":
        array = x.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    else:
        array = x.numpy().astype(np.float32, copy=False)
    try:
        meta = json.dumps({"prompts": list(prompts), "metadata": list(metadata)}, default=_json_default)
    except TypeError as exc:
        raise ValueError(f"remote reward: metadata must be JSON-serialisable to go over HTTP: {exc}") from exc
    buffer = io.BytesIO()
    np.savez(buffer, images=array, request=np.frombuffer(meta.encode("utf-8"), dtype=np.uint8))
    return buffer.getvalue()


def decode_request(body: bytes) -> Tuple[torch.Tensor, List[str], List[Dict[str, Any]]]:
    """Inverse of :func:`encode_request`: images as float32 in [0, 1]."""
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        array = data["images"]
        meta = json.loads(data["request"].tobytes().decode("utf-8"))
    if array.dtype == np.uint8:
        images = torch.from_numpy(array.astype(np.float32) / 255.0)
    elif array.dtype == np.float32:
        images = torch.from_numpy(np.array(array))
    else:
        raise ValueError(f"images must be uint8 or float32, got {array.dtype}")
    prompts = [str(p) for p in meta["prompts"]]
    metadata = meta.get("metadata") or [{} for _ in prompts]
    return images, prompts, metadata


# ----------------------------------------------------------------------------------------------- server


def _finite_json(obj: Any) -> Any:
    """A JSON-able copy of ``obj`` (other objects as ``str``) with every non-finite float as ``null``: JSON has no
    NaN, and the client refuses the bare ``NaN`` that ``json.dumps`` writes, so one NaN in a reward's details
    (a plugin's "not applicable" value) failed the whole answer."""
    return json.loads(json.dumps(obj, default=str), parse_constant=lambda constant: None)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, payload: Dict[str, Any]) -> None:
        body = json.dumps(_finite_json(payload)).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout passed) before the reward finished; nothing to answer.
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        reward = self.server.reward
        if self.path.rstrip("/") in ("", "/health"):
            self._send_json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/info":
            lo, hi = getattr(reward, "range", (-math.inf, math.inf))
            self._send_json(
                200,
                {
                    "name": reward.name,
                    "range": [
                        _finite_or_none(lo) if math.isfinite(lo) else str(lo),
                        _finite_or_none(hi) if math.isfinite(hi) else str(hi),
                    ],
                    "differentiable": bool(getattr(reward, "differentiable", False)),
                    "allows_nan": bool(getattr(reward, "allows_nan", False)),
                },
            )
        else:
            self._send_json(
                404, {"error": f"unknown path {self.path!r}; use POST /score, GET /info or GET /health"}
            )

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.rstrip("/") != "/score":
            self._send_json(404, {"error": f"unknown path {self.path!r}; POST to /score"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            images, prompts, metadata = decode_request(self.rfile.read(length))
            metadata = check_inputs(self.server.reward.name, images, prompts, metadata)
        except Exception as exc:
            self._send_json(400, {"error": f"malformed request: {type(exc).__name__}: {exc}"})
            return
        try:
            scores, details = self.server.score(images, prompts, metadata)
        except Exception as exc:
            self._send_json(
                422, {"error": str(exc) if isinstance(exc, RewardError) else f"{type(exc).__name__}: {exc}"}
            )
            return
        self._send_json(
            200,
            {
                "name": self.server.reward.name,
                "scores": [_finite_or_none(s) for s in scores],
                "details": details,
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], reward: Any, verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.reward = reward
        self.verbose = verbose
        self.lock = threading.Lock()  # models are not thread-safe; one batch at a time

    def score(self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]):
        name = self.reward.name
        with self.lock, torch.no_grad():
            out = as_reward_output(self.reward(images, prompts, metadata))
        scores = out.scores
        where = describe_batch(prompts)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(prompts),):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise RewardError(
                f"reward {name!r} returned scores of shape {shape}; expected [{len(prompts)}] (on {where})"
            )
        scores = scores.detach().float().cpu()
        bad = torch.isinf(scores)
        if not getattr(self.reward, "allows_nan", False):
            bad |= torch.isnan(scores)
        if bool(bad.any()):
            raise RewardError(
                f"reward {name!r} returned NaN/inf at indices {torch.nonzero(bad).flatten().tolist()[:10]} "
                f"(on {where})"
            )
        details = None if out.details is None else _finite_json(out.details)
        return scores.tolist(), details


class RewardServer:
    """An HTTP server hosting one reward object. ``url`` is where clients POST (``<url>/score``)."""

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> None:
        self.reward = reward
        self.httpd = _Server((host, int(port)), reward, verbose)
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.1)

    def start(self) -> "RewardServer":
        """Serve in a daemon thread and return at once (no-op when already serving)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"reward-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (the port can be bound again at once)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def join(self) -> None:
        """Block until the server is stopped (for servers started with :meth:`start`)."""
        if self._thread is not None:
            self._thread.join()


def serve_reward(
    spec: Union[RewardSpec, str, Mapping[str, Any], Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    block: bool = True,
    verbose: bool = False,
) -> RewardServer:
    """Host the reward described by ``spec`` (or an already-built reward object).

    ``block=True`` serves until interrupted; ``block=False`` starts a background thread and returns the server
    (``server.url``, ``server.stop()``). ``port=0`` picks a free port.
    """
    is_reward = callable(spec) and not isinstance(spec, (str, Mapping, RewardSpec))
    reward = spec if is_reward else build_reward(spec)
    if is_reward and not hasattr(reward, "name"):  # a plain function: wrapped as build_reward wraps a plugin's
        reward = FunctionReward(reward)
    server = RewardServer(reward, host, port, verbose=verbose)
    if not block:
        return server.start()
    print(f"serving reward {reward.name!r} at {server.url} (POST /score, GET /info)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return server


def add_serve_reward_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-reward`` sub-command to an argparse ``subparsers`` object (sets ``func``)."""
    p = subparsers.add_parser(
        "serve-reward",
        help="host a reward over HTTP for RemoteReward clients",
        description="Host a registered reward (or a dotted path my_pkg.mod:fn) over HTTP.",
    )
    _add_serve_arguments(p)
    p.set_defaults(func=_run_serve)
    return p


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered reward name or dotted path my_pkg.my_module:my_reward")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p.add_argument("--port", type=int, default=18090, help="port (default 18090; 0 picks a free one)")
    p.add_argument(
        "--kwargs", default="{}", help='JSON object of reward kwargs, e.g. \'{"backend": "tesseract"}\''
    )
    p.add_argument("--batch-size", type=int, default=None, help="reward's internal batch size")
    p.add_argument("--device", default=None, help="device of the reward's model (default: cuda if available)")
    p.add_argument("--verbose", action="store_true", help="log every request")


def _run_serve(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--kwargs must be a JSON object, got {args.kwargs!r}: {exc}") from None
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    try:  # an unknown name or a dotted path that does not import: one line naming the valid names
        get_factory(args.name)
    except (ValueError, ImportError, AttributeError) as exc:
        raise SystemExit(f"error: serve-reward NAME: {exc}") from None
    spec = RewardSpec(name=args.name, kwargs=kwargs, batch_size=args.batch_size, device=args.device)
    serve_reward(spec, args.host, args.port, block=True, verbose=args.verbose)
    return 0


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    """``diffalign serve-reward NAME [--host H] [--port P] [--kwargs JSON] [--batch-size N] [--device D]``."""
    p = argparse.ArgumentParser(prog="diffalign serve-reward", description="Host a reward over HTTP.")
    _add_serve_arguments(p)
    return _run_serve(p.parse_args(argv))


main = serve_main


# ----------------------------------------------------------------------------------------------- client


class RemoteReward:
    """Client of a :class:`RewardServer`; follows the reward protocol.

    Args:
        url: server address, e.g. ``http://127.0.0.1:18090`` (``/score`` is appended).
        batch_size: samples per request.
        timeout: seconds to wait for one answer; a server that hangs longer fails with an error naming
            the URL.
        retries: extra attempts after a connection error or a 5xx answer (0 = try once).
        backoff: first wait between attempts in seconds, doubled each time up to ``max_backoff``.
        retry_on_timeout: also retry after a timeout (default False: a hung server fails fast).
        encoding: ``"uint8"`` (4x smaller, scores as on a saved PNG) or ``"float32"`` (bit-exact).
        name / range / differentiable: what this client reports (the server is not contacted at build).
        use_env_proxy: honour ``http_proxy`` (default False: reward servers are on the local network).
    """

    trainable = False
    allows_nan = True  # the server already rejects NaN from rewards that do not allow it

    def __init__(
        self,
        *,
        url: str,
        batch_size: Optional[int] = 64,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        retry_on_timeout: bool = False,
        encoding: str = "uint8",
        name: str = "remote",
        range: Tuple[float, float] = (-math.inf, math.inf),
        differentiable: bool = False,
        use_env_proxy: bool = False,
        device: Any = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(
                f"remote reward: encoding={encoding!r} is not valid; use one of {list(ENCODINGS)}"
            )
        if differentiable:
            raise ValueError(
                "remote reward: scores come back as JSON numbers, so a remote reward is never differentiable"
            )
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.batch_size = batch_size
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.retry_on_timeout = bool(retry_on_timeout)
        self.encoding = encoding
        self.name = name
        self.range = tuple(range)
        self.differentiable = False
        self.device = torch.device("cpu")
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def _request(self, path: str, data: Optional[bytes]) -> Dict[str, Any]:
        url = self.url + path
        attempts = self.retries + 1
        started = time.monotonic()
        last: Optional[str] = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            req = urllib.request.Request(
                url,
                data=data,
                method="POST" if data is not None else "GET",
                headers={"Content-Type": "application/octet-stream"},
            )
            try:
                deadline = time.monotonic() + self.timeout  # the body as a whole, not each socket read
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = _read_until(resp, deadline)
            except urllib.error.HTTPError as exc:
                try:
                    message = json.loads(exc.read().decode("utf-8")).get("error", "")
                except Exception:
                    message = exc.reason
                if exc.code not in _RETRY_STATUS:
                    raise RewardError(
                        f"remote reward {self.name!r} at {url} answered HTTP {exc.code}: {message}"
                    ) from None
                last = f"HTTP {exc.code}: {message}"
            except (TimeoutError, socket.timeout) as exc:
                last = self._timeout_message(url)
                if not self.retry_on_timeout:
                    raise RewardError(last) from exc
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    last = self._timeout_message(url)
                    if not self.retry_on_timeout:
                        raise RewardError(last) from exc
                else:
                    last = f"{type(exc.reason).__name__}: {exc.reason}"
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                return self._parse(raw, url)
        raise RewardError(
            f"remote reward {self.name!r} at {url} failed after {attempts} attempt(s) over "
            f"{time.monotonic() - started:.1f}s; last error: {last}. Is the server running "
            f"(diffalign serve-reward NAME --port ...)?"
        )

    def _timeout_message(self, url: str) -> str:
        return (
            f"remote reward {self.name!r} at {url} did not answer within timeout={self.timeout:g}s "
            "(server hung or overloaded; raise 'timeout' or lower 'batch_size')"
        )

    def info(self) -> Dict[str, Any]:
        """The hosted reward's description (``GET /info``)."""
        return self._request("/info", None)

    def _parse(self, raw: bytes, url: str) -> Dict[str, Any]:
        """The JSON object of an answer, or a RewardError naming the reward and the URL."""
        try:
            answer = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise RewardError(f"remote reward {self.name!r} at {url} answered something that is not valid JSON "
                              f"({exc}): {raw[:120]!r}") from None
        if not isinstance(answer, dict):
            raise RewardError(f"remote reward {self.name!r} at {url} answered a JSON {type(answer).__name__}, "
                              "expected an object such as {\"scores\": [...]}")
        return answer

    def _score_chunk(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> RewardOutput:
        body = encode_request(images, prompts, metadata, self.encoding)
        answer = self._request("/score", body)
        scores = answer.get("scores")
        if not isinstance(scores, list) or len(scores) != len(prompts):
            raise RewardError(
                f"remote reward {self.name!r} at {self.url} answered "
                f"{len(scores) if isinstance(scores, list) else scores!r} "
                f"scores for {len(prompts)} samples"
            )
        bad = [i for i, v in enumerate(scores) if v is not None and not _finite_number(v)]
        if bad:
            raise RewardError(
                f"remote reward {self.name!r} at {self.url} answered non-numeric or non-finite scores at indices "
                f"{bad[:8]} (first: {scores[bad[0]]!r}); each score must be a finite number, or null for 'not "
                "applicable'")
        values = torch.tensor([float("nan") if s is None else float(s) for s in scores], dtype=torch.float32)
        return RewardOutput(scores=values, details=answer.get("details"))

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        metadata = check_inputs(self.name, images, prompts, metadata)
        prompts = list(prompts)
        n = images.shape[0]
        step = self.batch_size or n or 1
        scores, details, any_details = [], [], False
        for start in range(0, n, step):
            stop = min(start + step, n)
            out = self._score_chunk(images[start:stop], prompts[start:stop], metadata[start:stop])
            scores.append(out.scores)
            if out.details is not None:
                any_details = True
                details.extend(out.details)
            else:
                details.extend({} for _ in range(stop - start))
        cat = torch.cat(scores) if scores else torch.zeros(0)
        return RewardOutput(scores=cat.to(images.device), details=details if any_details else None)

    def __repr__(self) -> str:
        return f"RemoteReward({self.name!r}, url={self.url!r})"


def _finite_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))  # 1e999 parses to inf; a huge int overflows float
    except OverflowError:
        return False


def _reject_constant(name: str) -> float:
    """``json`` calls this for the non-standard ``NaN`` / ``Infinity`` literals: refuse them (null means NaN)."""
    raise ValueError(f"{name} is not valid JSON; send null for a sample the reward does not apply to")


def _read_until(resp: Any, deadline: float) -> bytes:
    """The body of ``resp``, read in pieces, failing with ``TimeoutError`` once ``deadline`` (monotonic) passes:
    the socket timeout alone bounds each read, so a server trickling bytes could hold the caller indefinitely.
    The deadline is checked between reads (each bounded by the socket timeout), so an answer gives up after at
    most about twice ``timeout`` (connection and headers, then the body)."""
    read = getattr(resp, "read1", None) or resp.read
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not complete within the timeout")
        chunk = read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@register_reward("remote")
def remote(**kwargs: Any) -> RemoteReward:
    """HTTP client of a reward served by ``diffalign serve-reward`` (kwargs: url, timeout, retries, ...)."""
    if "url" not in kwargs:
        raise ValueError("remote reward needs kwargs.url, e.g. {'url': 'http://127.0.0.1:18090'}")
    return RemoteReward(**kwargs)
