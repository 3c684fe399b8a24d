"""Ray Serve application: restore adversarial images over HTTP, optionally classify the result downstream.

Two deployments, composed with a :class:`~ray.serve.handle.DeploymentHandle`:

* ``TRNService`` - the FastAPI ingress *and* the restorer. Each replica validates and decodes uploads (size limits,
  decompression bombs, channel and resize policy), then hands the decoded image to a ``@serve.batch`` method that
  restores many concurrent requests in one forward pass (dynamic batching). Keeping the HTTP handlers in the model
  replica saves a hop per request; scale it with ``num_replicas`` or ``autoscaling``.
* ``DownstreamClassifier`` (only for ``downstream.kind`` = checkpoint / torchscript / export) - the classifier that
  ``POST /v1/classify`` forwards restored images to, batched too. ``kind: guard`` uses the restorer's own guard in
  the ``TRNService`` replica; ``kind: http`` POSTs the restored PNG to an external endpoint.

Both apply the defence stack of ``defenses`` (:mod:`trn.defenses.stack`; default ``[trn]``, the restorer alone):
its input side (e.g. bit-depth reduction, then TRN) runs in the ``TRNService`` replica and is what ``/v1/restore``
answers and ``/v1/classify`` classifies; its classifier wrappers (GCM, UniG) wrap the downstream classifier where that
runs as a torch module (the guard in ``TRNService``, or the ``DownstreamClassifier`` replica).

Endpoints: ``POST /v1/restore`` (cleaned PNG, or ``?format=npy|json`` for the float tensor), ``POST /v1/classify``
(label + probabilities), ``GET /healthz``, ``GET /docs`` / ``GET /openapi.json``.

Launch it with ``trn serve --config configs/serve.yaml``, ``serve run workers.serve:build_app restorer=...`` or
``serve deploy configs/serve_deploy.yaml`` (see docs/deploy.md). The library (:mod:`trn`) never imports Ray; this
module is the only place the service touches it.
"""

import asyncio
import email.message
import io
import json
import logging
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from trn.checkpoint import checkpoint_paths
from trn.defenses.stack import build_defense_stack, build_preprocessor
from trn.errors import CheckpointError, ConfigError, InputError, ShapeError, TRNError
from trn.imageio import decode_image, encode_png
from workers.defense_spec import (
    canonical_defenses,
    default_defenses,
    describe_defenses,
    split_defenses,
    uses_default_restorer,
)
from workers.serve_config import AppArgs, DownstreamArgs, ServeConfig, app_args_from_mapping, load_serve_config

__all__ = ["DownstreamClassifier", "TRNService", "api", "build_app", "load_downstream_model", "run_serve_command"]

log = logging.getLogger(__name__)

NPY_TYPES = ("application/x-npy", "application/npy")
SERVICE_NAME = "TRNService"
DOWNSTREAM_NAME = "DownstreamClassifier"


# ---------------------------------------------------------------------------------------------------- errors
class RequestError(Exception):
    """A request the service refuses: becomes a JSON error body with ``status``."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _error_response(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "type": kind, "message": message}}, status, headers=headers)


def _status_of(e: TRNError) -> int:
    # ShapeError: a decodable image of the wrong size/channels (policy "reject") -> 422; other input errors -> 400.
    if isinstance(e, ShapeError):
        return 422
    if isinstance(e, InputError):
        return 400
    return 500


# ---------------------------------------------------------------------------------------------------- API schema
class ErrorBody(BaseModel):
    status: int
    type: str = Field(description="InputError, ShapeError, BodyTooLarge, UnsupportedMediaType, ...")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ClassifyResponse(BaseModel):
    label: str = Field(description="name of the most probable class")
    index: int = Field(description="index of the most probable class")
    probabilities: dict[str, float] = Field(description="class name -> probability")
    classifier: str = Field(description="downstream kind that answered: guard, checkpoint, torchscript, export, http")
    resized_from: list[int] | None = Field(None, description="(H, W) of the upload when it was resized")


class HealthResponse(BaseModel):
    status: str
    restorer: str
    image_shape: list[int]
    device: str
    downstream: str
    defenses: str = Field(description="the defence stack, e.g. 'bit_depth(bits=4) -> trn -> gcm -> classifier'")
    max_batch_size: int
    batch_wait_timeout_s: float


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The image: raw bytes of a PNG/JPEG/... file (any image Content-Type or application/octet-stream), a "
            "multipart/form-data upload with a `file` field, or a float tensor as an .npy file "
            "(application/x-npy; (C, H, W), (H, W) or (1, C, H, W), values in [0, 1], or uint8)."
        ),
        "content": {
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "application/octet-stream": _BINARY,
            "application/x-npy": _BINARY,
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                           "required": ["file"]}
            },
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "not an image, truncated, empty, too many pixels, bad tensor"},
    413: {"model": ErrorResponse, "description": "body larger than max_body_bytes"},
    415: {"model": ErrorResponse, "description": "unsupported Content-Type"},
    422: {"model": ErrorResponse, "description": "wrong size (resize policy 'reject') or channel count"},
    503: {"description": "overloaded (max_queued_requests reached)"},
}

api = FastAPI(
    title="TRN restoration service",
    version="1",
    description=(
        "Cleans adversarial images with a Two-stream Restoration Network before they reach a classifier. "
        "Off-size images are rejected or resized according to the service's `resize` setting, never silently; "
        "a resize is reported in the `X-TRN-Resized-From` header."
    ),
)


@api.exception_handler(RequestError)
async def _on_request_error(request: Request, e: RequestError) -> JSONResponse:
    return _error_response(e.status, e.kind, e.message)


@api.exception_handler(TRNError)
async def _on_trn_error(request: Request, e: TRNError) -> JSONResponse:
    return _error_response(_status_of(e), type(e).__name__, str(e))


@api.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    msg = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
    return _error_response(422, "ValidationError", msg)


@api.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error_response(e.status_code, "HTTPError", str(e.detail), getattr(e, "headers", None))


# ---------------------------------------------------------------------------------------------------- request parsing
async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared Content-Length or bytes actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, "BadRequest", f"Content-Length is not a number: {declared!r}") from None
        if n > limit:
            raise RequestError(413, "BodyTooLarge", f"request body is {n} bytes, over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "BodyTooLarge", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The ``file`` (or first file) part of a multipart/form-data body, byte-exact."""
    msg = email.message.Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise InputError("multipart/form-data without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    found: dict[str, bytes] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # closing delimiter
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise InputError("malformed multipart/form-data part (no header/body separator)")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = email.message.Message()
        for line in head.decode("latin-1").strip("\r\n").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip()] = v.strip()
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_param("filename", header="content-disposition")
        if name == "file":
            return content
        if filename is not None or name == "image":
            found.setdefault("first", content)
    if "first" in found:
        return found["first"]
    raise InputError("multipart/form-data body has no file part (send the image as the field 'file')")


def _decode_npy(data: bytes, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A (C, H, W) float32 array in [0, 1] from .npy bytes; the header is checked before the data is read."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise InputError(f"unsupported .npy version {version}")
    except InputError:
        raise
    except (ValueError, OSError, SyntaxError) as e:
        raise InputError(f"not a valid .npy file: {e}") from e
    want = (channels, *size)
    if not (shape == want or shape == (1, *want) or (channels == 1 and shape == size)):
        raise ShapeError(f"tensor has shape {tuple(shape)}, expected {want}, (1, {channels}, ...) "
                         f"{'or ' + str(tuple(size)) if channels == 1 else ''} (tensors are never resized)")
    if dtype.hasobject or not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise InputError(f"tensor dtype must be uint8 or float, got {dtype}")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"truncated or corrupt .npy file: {e}") from e
    a = a.reshape(want)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError("tensor contains NaN or infinity")
    if a.min() < 0.0 or a.max() > 1.0:
        raise InputError(f"float tensor values must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]")
    return a


# ---------------------------------------------------------------------------------------------------- helpers
def _pick_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    import ray

    # In a replica: only the GPUs Ray assigned to it. Outside Ray (tests, scripts): whatever torch sees.
    has_gpu = bool(ray.get_gpu_ids()) if ray.is_initialized() else True
    return torch.device("cuda" if has_gpu and torch.cuda.is_available() else "cpu")


def _probabilities(out: torch.Tensor) -> torch.Tensor:
    """Rows of probabilities from a classifier's output: softmax of logits, or the output itself when it already is
    a probability vector (non-negative rows summing to 1)."""
    out = out.detach().float()
    if out.ndim == 1:
        out = out[None]
    if out.ndim != 2:
        raise InputError(f"classifier output must be (N, num_classes), got shape {tuple(out.shape)}")
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device), atol=1e-4):
        return out
    return torch.softmax(out, dim=1)


def _read_meta(path: str, kind: str) -> dict:
    """The JSON side of a safetensors checkpoint, without loading weights (build-time checks)."""
    meta_path = checkpoint_paths(path)[1]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from e
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (kind={meta.get('kind')!r})")
    return meta


def _cluster_has_gpus() -> bool:
    """GPUs in the Ray cluster (connected), else on this machine (``serve run`` builds the app before ray.init)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


def load_downstream_model(ds: DownstreamArgs, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load the downstream classifier named by ``ds`` (kind checkpoint / torchscript / export) for inference.

    TorchScript and ``torch.export`` files are programs: loading one runs code the operator chose. Load only files
    you trust (our own checkpoints are safetensors + JSON and unpickle nothing).

    Returns:
        (callable model taking [0, 1] (N, C, H, W) and returning logits or probabilities, metadata dict)

    Raises:
        CheckpointError: a file that cannot be loaded as that kind.
    """
    from trn.classifiers import load_classifier

    device = torch.device(device)
    if ds.kind == "checkpoint":
        model, meta = load_classifier(ds.path, device)
        return model, meta
    path = Path(ds.path or "")
    if not path.is_file():
        raise CheckpointError(f"downstream.path: file not found: {path}")
    try:
        if ds.kind == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but still loads
                model = torch.jit.load(str(path), map_location=device)
            model.eval()
        elif ds.kind == "export":
            program = torch.export.load(str(path))
            model = program.module().to(device)
        else:
            raise ConfigError(f"downstream.kind {ds.kind!r} is not a loadable model")
    except ConfigError:
        raise
    except Exception as e:  # torch raises many types (RuntimeError, BadZipFile, ...) on a bad file
        raise CheckpointError(f"cannot load {ds.kind} program {path}: {e}") from e
    return model, {"kind": ds.kind, "path": str(path)}


def _wrap(model: torch.nn.Module, spec: list[dict[str, Any]] | None, what: str) -> torch.nn.Module:
    """``model`` inside the classifier wrappers (gcm, unig) of a canonical defence stack, the first listed closest
    to it (as :func:`~trn.defenses.stack.build_defense_stack` does); the input-side entries are skipped.

    Raises:
        ConfigError: a wrapper that does not fit ``what`` (UniG needs ``forward_features`` / ``forward_head``, which a
            TorchScript or ``torch.export`` program usually lacks) or a bad wrapper setting, named by its index in
            the whole stack.
    """
    inputs, wrappers = split_defenses(canonical_defenses(spec, "defenses") if spec else [])
    for i, entry in enumerate(wrappers, start=len(inputs)):  # the wrappers come after every input-side entry
        try:
            model = build_defense_stack([entry], model).classifier
        except ConfigError as e:
            msg = str(e).removeprefix(f"defence #0 ({entry['name']}): ")
            raise ConfigError(f"defenses: defence #{i} ({entry['name']}) around {what}: {msg}") from e
    return model


def _parse_downstream_json(data: Any, url: str) -> tuple[np.ndarray | None, Any]:
    """Accept {"probabilities": [...] | {name: p}}, {"logits": [...]} or {"label": ...} from an HTTP classifier."""
    if not isinstance(data, dict):
        raise RequestError(502, "DownstreamError", f"downstream {url} answered {type(data).__name__}, not an object")
    try:
        if "probabilities" in data or "logits" in data:
            key = "probabilities" if "probabilities" in data else "logits"
            vals = data[key]
            if isinstance(vals, dict):  # named probabilities: keep the endpoint's order
                vals = list(vals.values())
            t = torch.tensor([float(v) for v in vals])
            if t.ndim != 1 or len(t) == 0 or not torch.isfinite(t).all():
                raise ValueError(f"{key} must be a non-empty list of finite numbers")
            probs = torch.softmax(t, 0) if key == "logits" else _probabilities(t)[0]
            return probs.numpy(), data.get("label")
        if "label" in data:
            return None, data["label"]
    except (TypeError, ValueError) as e:
        raise RequestError(502, "DownstreamError", f"downstream {url}: bad answer: {e}") from None
    raise RequestError(502, "DownstreamError", f"downstream {url} answered without probabilities, logits or label")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) from an image header, without decoding (to report resizes); None when unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - decode_image reports the real problem
        return None


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InputError(f"downstream model returned {type(out).__name__}, expected a tensor of logits")
    return out


def _build_defenses(spec: list[dict[str, Any]], restorer: torch.nn.Module, kind: str,
                    device: torch.device | str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(input side, classifier for ``/v1/classify`` when ``kind`` is guard) of a canonical defence stack.

    With ``downstream.kind: guard`` the classifier wrappers wrap ``restorer.guard``; with any other kind they are left
    to the ``DownstreamClassifier`` deployment (and refused by :class:`AppArgs` for ``http`` / ``none``), and the
    returned classifier is the plain guard (unused).

    Raises:
        ConfigError: a bad value (``bits: 99``) or a wrapper that does not fit the guard, named with the option.
    """
    default = restorer if uses_default_restorer(spec) else None
    try:
        if kind == "guard":
            stack = build_defense_stack(spec, restorer.guard, restorer=default)
            return stack.preprocessor, stack.classifier
        return build_preprocessor(split_defenses(spec)[0], restorer=default, device=device), restorer.guard
    except ConfigError as e:
        raise ConfigError(f"defenses: {e}") from e


# ---------------------------------------------------------------------------------------------------- deployments
@serve.deployment(name=DOWNSTREAM_NAME)
class DownstreamClassifier:
    """A classifier replica for ``POST /v1/classify``: batched forward passes over restored images.

    ``defenses``: the app's defence stack (canonical, plain data); its classifier wrappers (gcm, unig) are put around
    the loaded model, its input side has already run in ``TRNService``.
    """

    def __init__(self, ds: DownstreamArgs, threads: int = 1, defenses: list[dict[str, Any]] | None = None) -> None:
        torch.set_num_threads(threads)
        self.ds = ds
        self.device = _pick_device(ds.device)
        self.model, self.meta = load_downstream_model(ds, self.device)
        self.model = _wrap(self.model, defenses, f"the {ds.kind} downstream {ds.path}")
        self.per_item = False  # set when an exported program has a fixed batch size of 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="trn-downstream")
        log.info("downstream %s %s on %s", ds.kind, ds.path, self.device)

    def reconfigure(self, config: dict) -> None:
        self.classify.set_max_batch_size(int(config["max_batch_size"]))
        self.classify.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    def _forward(self, images: list[np.ndarray]) -> list[np.ndarray]:
        x = torch.from_numpy(np.stack(images)).to(self.device)  # (B, C, H, W)
        with torch.no_grad():
            if not self.per_item:
                try:
                    return list(_probabilities(_first(self.model(x))).cpu().numpy())
                except (RuntimeError, AssertionError) as e:
                    if self.ds.kind != "export" or len(images) == 1:
                        raise
                    log.warning("exported program refused a batch of %d (%s); running one image at a time - export "
                                "it with a dynamic batch dimension for batching", len(images), e)
                    self.per_item = True
            return [_probabilities(_first(self.model(x[i : i + 1]))).cpu().numpy()[0] for i in range(len(x))]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(C, H, W) float32 image in [0, 1] -> (num_classes,) probabilities; batched across callers."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._forward, images)

    def check_health(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA device lost")


@serve.deployment(name=SERVICE_NAME)
@serve.ingress(api)
class TRNService:
    """HTTP ingress + batched restorer (one replica: FastAPI handlers and one model copy).

    The "restorer" is the input side of the defence stack (``args.defenses``; default ``[trn]``); with
    ``downstream.kind: guard`` the stack's classifier wrappers wrap the guard that answers ``/v1/classify``.
    """

    def __init__(self, args: AppArgs, info: dict, downstream: DeploymentHandle | None = None) -> None:
        from trn.restorer import Restorer

        torch.set_num_threads(args.threads)
        self.args, self.info, self.downstream = args, info, downstream
        self.device = _pick_device(args.device)
        self.restorer = Restorer.load(args.restorer, self.device)
        self.channels, self.height, self.width = (int(v) for v in self.restorer.image_shape)
        spec = default_defenses() if args.defenses is None else args.defenses
        self.preprocessor, self.classifier = _build_defenses(spec, self.restorer, args.downstream.kind, self.device)
        self.defenses = describe_defenses(spec)
        self.class_names = list(self.restorer.class_names)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="trn-restore")  # the model runs here, off the loop
        self._fatal: str | None = None
        self._http = None
        if args.downstream.kind == "http":
            import httpx

            self._http = httpx.AsyncClient(timeout=args.downstream.timeout_s)
        self._batch_params = (args.max_batch_size, args.batch_wait_timeout_s)
        log.info("restorer %s on %s, image shape %s, defences %s", args.restorer, self.device,
                 self.restorer.image_shape, self.defenses)

    # -------------------------------------------------------------- Serve hooks
    def reconfigure(self, config: dict) -> None:
        """``user_config``: batching can be retuned live (``serve deploy`` with new values, no restart)."""
        mbs, wait = int(config["max_batch_size"]), float(config["batch_wait_timeout_s"])
        self._restore_batch.set_max_batch_size(mbs)
        self._restore_batch.set_batch_wait_timeout_s(wait)
        self._batch_params = (mbs, wait)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: a lost GPU or an unrecoverable model error."""
        if self._fatal:
            raise RuntimeError(self._fatal)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA device lost")

    # -------------------------------------------------------------- model
    def _run_model(self, images: list[np.ndarray], want_logits: list[bool]) -> list[tuple[np.ndarray, Any, int]]:
        x = torch.from_numpy(np.stack(images)).to(self.device)  # (B, C, H, W)
        try:
            # no_grad, not inference_mode: TRN's gradient stream needs autograd through the guard (it enables it)
            with torch.no_grad():
                y = self.preprocessor(x)
                probs = _probabilities(self.classifier(y)).cpu().numpy() if any(want_logits) else None
            y = y.cpu()
        except RuntimeError as e:
            if "CUDA" in str(e) or "out of memory" in str(e):
                self._fatal = f"model failure: {e}"
            raise
        out = y.numpy()
        n = len(images)
        return [(out[i], probs[i] if probs is not None and want_logits[i] else None, n) for i in range(n)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _restore_batch(self, images: list[np.ndarray], want_logits: list[bool]) -> list[tuple]:
        # A batch runs when max_batch_size requests wait or the oldest has waited batch_wait_timeout_s. The forward
        # pass runs in a worker thread so the event loop keeps accepting (and decoding) the next batch meanwhile.
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run_model, images, want_logits)

    # -------------------------------------------------------------- request handling
    async def _image_from_request(self, request: Request) -> tuple[np.ndarray, tuple[int, int] | None]:
        body = await _read_body(request, self.args.max_body_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        size = (self.height, self.width)
        if ctype in NPY_TYPES:
            return _decode_npy(body, self.channels, size), None
        if ctype == "multipart/form-data":
            body = _multipart_file(body, request.headers["content-type"])
        elif ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise RequestError(415, "UnsupportedMediaType",
                               f"Content-Type {ctype!r} is not accepted: send image bytes (image/* or "
                               "application/octet-stream), multipart/form-data with a 'file' field, or "
                               "application/x-npy")
        resized_from = _header_size(body) if self.args.resize == "resize" else None
        image = await asyncio.to_thread(
            decode_image, body, channels=self.channels, size=size, resize=self.args.resize,
            channel_policy=self.args.channel_policy, max_pixels=self.args.max_pixels,
        )
        if resized_from == size:
            resized_from = None
        return image, resized_from

    @api.get("/healthz", response_model=HealthResponse, summary="Liveness and settings of this replica")
    async def healthz(self) -> HealthResponse:
        if self._fatal:
            raise RequestError(503, "Unhealthy", self._fatal)
        mbs, wait = self._batch_params
        return HealthResponse(status="ok", restorer=Path(self.args.restorer).name,
                              image_shape=[self.channels, self.height, self.width], device=str(self.device),
                              downstream=self.args.downstream.kind, defenses=self.defenses, max_batch_size=mbs,
                              batch_wait_timeout_s=wait)

    @api.post(
        "/v1/restore",
        summary="Restore one image",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "application/x-npy": {}, "application/json": {}},
                         "description": "the restored image (PNG), or its float32 (C, H, W) tensor"}, **_ERRORS},
        openapi_extra=_REQUEST_BODY,
    )
    async def restore(
        self,
        request: Request,
        format: Literal["png", "npy", "json"] = Query(
            "png", description="png: 8-bit PNG; npy / json: the float32 (C, H, W) tensor in [0, 1]"),
    ) -> Response:
        image, resized_from = await self._image_from_request(request)
        restored, _, batch = await self._restore_batch(image, False)
        headers = {"X-TRN-Batch-Size": str(batch)}
        if resized_from:
            headers["X-TRN-Resized-From"] = f"{resized_from[0]}x{resized_from[1]}"
        if format == "npy":
            buf = io.BytesIO()
            np.save(buf, restored.astype(np.float32), allow_pickle=False)
            return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)
        if format == "json":
            payload = {"shape": list(restored.shape), "dtype": "float32", "data": restored.tolist()}
            return JSONResponse(payload, headers=headers)
        return Response(encode_png(restored), media_type="image/png", headers=headers)

    @api.post(
        "/v1/classify",
        summary="Restore one image, then classify it with the downstream classifier",
        response_model=ClassifyResponse,
        responses={**_ERRORS, 502: {"model": ErrorResponse, "description": "downstream failed"},
                   504: {"model": ErrorResponse, "description": "downstream timed out"}},
        openapi_extra=_REQUEST_BODY,
    )
    async def classify(self, request: Request) -> JSONResponse:
        kind = self.args.downstream.kind
        if kind == "none":
            raise RequestError(404, "NoClassifier", "this service has no downstream classifier (downstream.kind: none)")
        image, resized_from = await self._image_from_request(request)
        restored, probs, batch = await self._restore_batch(image, kind == "guard")
        if kind == "http":
            probs, label = await self._classify_http(restored)
        elif kind != "guard":
            probs, label = np.asarray(await self.downstream.classify.remote(restored)), None
        else:
            label = None
        names = self._names(len(probs)) if probs is not None else []
        if probs is None:  # an HTTP endpoint that answered only a label
            body = {"label": str(label), "index": -1, "probabilities": {}}
        else:
            idx = int(np.argmax(probs))
            body = {"label": names[idx], "index": idx,
                    "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs)}}
        body |= {"classifier": kind, "resized_from": list(resized_from) if resized_from else None}
        return JSONResponse(body, headers={"X-TRN-Batch-Size": str(batch)})

    def _names(self, n: int) -> list[str]:
        names = self.info.get("downstream_class_names") or (self.class_names if self.args.downstream.kind == "guard"
                                                             else None)
        if names is None and len(self.class_names) == n:
            names = self.class_names
        if names is None:
            return [str(i) for i in range(n)]
        if len(names) != n:
            raise RequestError(500, "ConfigError", f"downstream returned {n} classes but {len(names)} class names "
                                                   "are configured (downstream.class_names)")
        return list(names)

    async def _classify_http(self, restored: np.ndarray) -> tuple[np.ndarray | None, Any]:
        import httpx

        url = self.args.downstream.url
        try:
            r = await self._http.post(url, content=encode_png(restored), headers={"Content-Type": "image/png"})
        except httpx.TimeoutException:
            raise RequestError(504, "DownstreamTimeout", f"downstream {url} did not answer within "
                                                         f"{self.args.downstream.timeout_s} s") from None
        except httpx.HTTPError as e:
            raise RequestError(502, "DownstreamError", f"downstream {url} unreachable: {e}") from None
        if r.status_code >= 400:
            raise RequestError(502, "DownstreamError", f"downstream {url} answered {r.status_code}: {r.text[:200]}")
        try:
            data = r.json()
        except ValueError:
            raise RequestError(502, "DownstreamError", f"downstream {url} did not answer JSON") from None
        return _parse_downstream_json(data, url)


# ---------------------------------------------------------------------------------------------------- builder
def _check_defenses(args: AppArgs, meta: dict) -> None:
    """Build ``args.defenses`` once on the CPU, as the replicas will, so that every value is checked before anything
    starts: parameter values, ``trn`` checkpoints (which must restore the restorer's image size) and, with a deployed
    downstream, whether the wrappers fit its model (UniG needs ``forward_features`` / ``forward_head``).

    Raises:
        ConfigError / CheckpointError: what the replicas would otherwise fail with at start-up.
    """
    from trn.restorer import Restorer

    spec = args.defenses or []
    shape = meta.get("image_shape")
    for i, entry in enumerate(spec):
        if entry["name"] == "trn" and entry.get("checkpoint"):
            other = _read_meta(entry["checkpoint"], "restorer").get("image_shape")
            if other != shape:
                raise ConfigError(f"defenses: defence #{i} (trn) restores {other} images but the service decodes "
                                  f"images for `restorer`, {shape}")
    _build_defenses(spec, Restorer.load(args.restorer), args.downstream.kind, "cpu")
    ds = args.downstream
    if split_defenses(spec)[1] and ds.deployed:
        _wrap(load_downstream_model(ds, "cpu")[0], spec, f"the {ds.kind} downstream {ds.path}")


def build_app(args: AppArgs | Mapping[str, Any]) -> Application:
    """The TRN Serve application (``serve run workers.serve:build_app`` / ``import_path`` of a Serve config file).

    Args:
        args: :class:`AppArgs`, or the mapping Serve passes (config file ``args:``, or ``key=value`` strings from
            ``serve run``; dotted keys reach sections, ``config=configs/serve.yaml`` starts from that file's ``app:``).

    Raises:
        ConfigError: bad option, missing checkpoint, a downstream that does not fit the restorer, or a defence stack
            that cannot be built (checked by building it on the CPU here, before anything starts).
        CheckpointError: a checkpoint whose metadata is unreadable or of the wrong kind.
    """
    app_args = args if isinstance(args, AppArgs) else app_args_from_mapping(args)
    app_args = app_args.with_resolved_paths()
    meta = _read_meta(app_args.restorer, "restorer")
    ds = app_args.downstream
    info: dict[str, Any] = {"image_shape": meta.get("image_shape"), "downstream_class_names": ds.class_names}
    restorer_names = meta.get("class_names") or []
    if ds.kind == "checkpoint":
        dmeta = _read_meta(ds.path, "classifier")
        n = dmeta.get("arch_kwargs", {}).get("num_classes")
        names = ds.class_names or dmeta.get("class_names")
        if names is None and n is not None and len(restorer_names) == n:
            names = restorer_names
        if names is not None and n is not None and len(names) != n:
            raise ConfigError(f"downstream.class_names has {len(names)} names but {ds.path} has {n} classes")
        info["downstream_class_names"] = names
    elif ds.kind == "guard" and ds.class_names and len(ds.class_names) != len(restorer_names):
        raise ConfigError(f"downstream.class_names has {len(ds.class_names)} names but the guard has "
                          f"{len(restorer_names)} classes")
    if ds.kind == "guard" and ds.class_names:
        info["downstream_class_names"] = ds.class_names
    if app_args.defenses is not None:
        _check_defenses(app_args, meta)

    gpus = _cluster_has_gpus() if (app_args.num_gpus is None or (ds.deployed and ds.num_gpus is None)) else False
    share = 0.5 if ds.deployed else 1.0  # one GPU holds a restorer + downstream pair by default
    num_gpus = app_args.num_gpus if app_args.num_gpus is not None else (share if gpus else 0)

    downstream_app = None
    if ds.deployed:
        ds_gpus = ds.num_gpus if ds.num_gpus is not None else (0.5 if gpus else 0)
        downstream_app = DownstreamClassifier.options(
            num_replicas=ds.num_replicas,
            max_ongoing_requests=2 * ds.max_batch_size,
            ray_actor_options={"num_cpus": ds.num_cpus, "num_gpus": ds_gpus},
            user_config={"max_batch_size": ds.max_batch_size, "batch_wait_timeout_s": ds.batch_wait_timeout_s},
            health_check_period_s=app_args.health_check_period_s,
        ).bind(ds, max(1, int(ds.num_cpus)), app_args.defenses)

    scaling: dict[str, Any] = (
        {"autoscaling_config": app_args.autoscaling.to_ray()} if app_args.autoscaling
        else {"num_replicas": app_args.num_replicas}
    )
    return TRNService.options(
        **scaling,
        max_ongoing_requests=app_args.restorer_max_ongoing_requests,
        max_queued_requests=app_args.max_queued_requests,
        ray_actor_options={"num_cpus": app_args.num_cpus, "num_gpus": num_gpus},
        user_config={"max_batch_size": app_args.max_batch_size, "batch_wait_timeout_s": app_args.batch_wait_timeout_s},
        health_check_period_s=app_args.health_check_period_s,
    ).bind(app_args, info, downstream_app)


# ---------------------------------------------------------------------------------------------------- trn serve
def run_serve_command(args: Any) -> int:
    """``trn serve``: start (or join) Ray, start Serve on ``host:port``, deploy the app; block until Ctrl-C.

    ``args``: ``config`` (YAML path or None), ``set`` (``key=value`` overrides), ``address`` (Ray address or None),
    ``blocking``. Returns the exit code. Without ``--address`` a local Ray is started and ends with this process,
    so ``--no-blocking`` only makes sense together with ``--address``.
    """
    import ray

    cfg: ServeConfig = load_serve_config(getattr(args, "config", None), list(getattr(args, "set", None) or []))
    address = getattr(args, "address", None) or cfg.ray_address
    blocking = bool(getattr(args, "blocking", True))
    build_app(cfg.app)  # config and checkpoint errors surface here, before anything starts
    started_ray = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
            started_ray = True
    try:
        app = build_app(cfg.app)  # again, now that the cluster's GPUs are known (num_gpus defaults)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except BaseException:
        if started_ray:  # do not leave a half-started local Ray behind
            serve.shutdown()
            ray.shutdown()
        raise
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    log.info("TRN service %r ready: %s/v1/restore, %s/docs (Serve keeps the HTTP options it was first started "
             "with on a running cluster)", cfg.app_name, url, url)
    if not blocking:
        if started_ray:
            log.warning("--no-blocking with a local Ray: the service stops when this process exits; pass --address "
                        "to leave it running on a cluster")
        return 0
    print(f"serving on {url}  (docs: {url}/docs); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("stopping %r", cfg.app_name)
    finally:
        serve.delete(cfg.app_name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
