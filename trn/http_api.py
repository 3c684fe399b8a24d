"""The HTTP side of the TRN service, without Ray: the FastAPI app, its schema and error bodies, request parsing.

:mod:`trn_workers.serve` mounts :data:`api` on its Ray Serve deployment (``@serve.ingress(api)``) and adds the endpoints;
everything here is plain FastAPI / Starlette and can be reused or tested without Ray.

* errors: :class:`RequestError` becomes ``{"error": {"status", "type", "message"}}`` with its status (and headers,
  e.g. ``Retry-After``); the project's own errors map to 400 / 422 / 500;
* request bodies: :func:`read_body` (size limit on the declared and the actual length), :func:`body_format` (which
  Content-Type goes where, 415 for the rest), :func:`multipart_files` (parsed by Starlette / python-multipart:
  ``UploadFile``), :func:`decode_images` (the decoded images, under the app's size, channel and pixel policies);
* the output policy a request asks for: :func:`request_policy` (422 / 403);
* an external HTTP classifier: :func:`classify_http` (502 / 504) and :func:`parse_downstream_json`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile  # what Request.form() yields (fastapi.UploadFile subclasses it)
from starlette.exceptions import HTTPException as StarletteHTTPException

from trn.errors import ConfigError, InputError, RequestError, ShapeError, TRNError
from trn.imageio import decode_image, encode_png
from trn.output_policy import OutputPolicy, probabilities_from_output, restrict
from trn.serving import decode_npy, decode_npz_batch

if TYPE_CHECKING:
    import httpx

    from trn.serve_config import AppArgs

__all__ = [
    "NPY_TYPES",
    "NPZ_TYPES",
    "BatchClassifyResponse",
    "ClassifyResponse",
    "ErrorResponse",
    "HealthResponse",
    "RequestError",
    "api",
    "body_format",
    "classify_http",
    "decode_images",
    "error_response",
    "first_tensor",
    "header_size",
    "multipart_files",
    "output_query",
    "parse_downstream_json",
    "read_body",
    "request_policy",
]

NPY_TYPES = ("application/x-npy", "application/npy")
NPZ_TYPES = ("application/x-npz", "application/npz", "application/zip")
BodyFormat = Literal["npy", "npz", "multipart", "image"]


# ---------------------------------------------------------------------------------------------------- errors
def error_response(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "type": kind, "message": message}}, status, headers=headers)


def status_of(e: TRNError) -> int:
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
    probabilities: dict[str, float] | None = Field(
        description="class name -> probability: all classes (full, rounded), the k most probable first (top_k), or "
                    "null (label)")
    output: str = Field(description="the output policy that answered: full, top_k, rounded or label")
    classifier: str = Field(description="downstream kind that answered: guard, checkpoint, torchscript, export, http")
    resized_from: list[int] | None = Field(None, description="(H, W) of the upload when it was resized")


class BatchClassifyResponse(BaseModel):
    results: list[ClassifyResponse] = Field(description="one answer per image, in the order sent")


class HealthResponse(BaseModel):
    status: str
    restorer: str
    image_shape: list[int]
    device: str
    downstream: str
    defenses: str = Field(description="the defence stack, e.g. 'bit_depth(bits=4) -> trn -> gcm -> classifier'")
    output: str = Field(description="the most a /v1/classify answer shows, e.g. 'label' or 'top_k(k=3)'")
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
    429: {"model": ErrorResponse, "description": "query budget spent (see the Retry-After header)"},
    503: {"description": "overloaded (max_queued_requests reached)"},
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "Many images: multipart/form-data with one file part per image (any field names, in order), or an .npz "
            "(application/x-npz; one array, or one named `images`, (N, C, H, W) or (N, H, W), uint8 or float in "
            "[0, 1]; loaded without pickle). At most max_batch_images images; each costs one query of the budget."
        ),
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/x-npz": _BINARY,
        },
    }
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
    return error_response(e.status, e.kind, e.message, e.headers)


@api.exception_handler(TRNError)
async def _on_trn_error(request: Request, e: TRNError) -> JSONResponse:
    return error_response(status_of(e), type(e).__name__, str(e))


@api.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    msg = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
    return error_response(422, "ValidationError", msg)


@api.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, "HTTPError", str(e.detail), getattr(e, "headers", None))


# ---------------------------------------------------------------------------------------------------- request parsing
async def read_body(request: Request, limit: int) -> bytes:
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


def body_format(content_type: str, batch: bool) -> BodyFormat:
    """How to read a body sent with the ``Content-Type`` header ``content_type`` (parameters ignored): ``npy`` (one
    tensor), ``npz`` (batch endpoints only), ``multipart`` or ``image`` (raw image bytes; also without a type).

    Raises:
        RequestError: 415 for any other type (the batch endpoints take only multipart and .npz).
    """
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in NPY_TYPES and not batch:
        return "npy"
    if ctype in NPZ_TYPES and batch:
        return "npz"
    if ctype == "multipart/form-data":
        return "multipart"
    if batch:
        raise RequestError(415, "UnsupportedMediaType",
                           f"Content-Type {ctype!r} is not accepted here: send multipart/form-data with one file "
                           "part per image, or an .npz (application/x-npz)")
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise RequestError(415, "UnsupportedMediaType",
                           f"Content-Type {ctype!r} is not accepted: send image bytes (image/* or "
                           "application/octet-stream), multipart/form-data with a 'file' field, or "
                           "application/x-npy")
    return "image"


def decode_images(parts: Sequence[bytes], fmt: BodyFormat, settings: AppArgs, image_shape: Sequence[int]
                  ) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
    """The (C, H, W) float32 images of a request body, each with the (H, W) it was resized from (or None).

    Args:
        parts: the body (``npy``, ``npz``, ``image``), or its file parts (``multipart``: :func:`multipart_files`).
        fmt: what :func:`body_format` said of the body.
        settings: the app's ``resize``, ``channel_policy``, ``max_pixels`` and ``max_batch_images`` (.npz) apply.
        image_shape: (C, H, W) the restorer takes; tensors must have it, images are checked or resized to it.

    Raises:
        InputError / ShapeError: undecodable, too many pixels or images, or the wrong shape (400 / 422).
    """
    channels, size = int(image_shape[0]), (int(image_shape[1]), int(image_shape[2]))
    if fmt == "npy":
        return [(decode_npy(parts[0], channels, size), None)]
    if fmt == "npz":
        return [(img, None) for img in decode_npz_batch(parts[0], channels, size, settings.max_batch_images)]
    out = []
    for data in parts:
        resized_from = header_size(data) if settings.resize == "resize" else None
        image = decode_image(data, channels=channels, size=size, resize=settings.resize,
                             channel_policy=settings.channel_policy, max_pixels=settings.max_pixels)
        out.append((image, None if resized_from == size else resized_from))
    return out


def output_query(
    output: Literal["full", "top_k", "rounded", "label"] | None = Query(
        None, description="ask for less than the app's output policy (never more: 403)"),
    k: int | None = Query(None, ge=1, description="classes shown by output=top_k"),
    decimals: int | None = Query(None, ge=0, le=6, description="decimals of output=rounded"),
) -> tuple[str | None, int | None, int | None]:
    """The output-policy query parameters of the classify endpoints (a FastAPI dependency): ``(output, k, decimals)``
    for :func:`request_policy`."""
    return output, k, decimals


def request_policy(app: OutputPolicy, output: str | None, k: int | None, decimals: int | None,
                   num_classes: int) -> OutputPolicy:
    """The output policy of a request (query ``output``, ``k``, ``decimals``): the app's ``app``, or less when the
    request asks (:func:`~trn.output_policy.restrict`).

    ``top_k`` (and ``rounded`` on a rounded app) inherit the app's decimals; ``full`` always means every decimal.

    Raises:
        RequestError: 422 (``ValidationError``) for a malformed policy, 403 (``OutputNotAllowed``) for one that shows
            more than ``app``.
    """
    if output is None and k is None and decimals is None:
        return app
    name = output or app.policy
    try:
        inherit = name == "top_k" or (name == "rounded" and app.policy == "rounded")
        wanted = OutputPolicy(name, k=k if k is not None else app.k,
                              decimals=decimals if decimals is not None else (app.precision if inherit else None))
        return restrict(app, wanted, num_classes)
    except ConfigError as e:
        raise RequestError(422, "ValidationError", str(e)) from None
    except InputError as e:
        raise RequestError(403, "OutputNotAllowed", str(e)) from None


async def multipart_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    """The file parts of a multipart/form-data body, in order, parsed by Starlette (python-multipart).

    ``body`` has already been read under the size limit; Starlette parses it from there. With ``max_files == 1``
    the part named ``file`` wins over others.

    Raises:
        InputError: a malformed body, or no file part (send the image as the field ``file``).
        RequestError: more than ``max_files`` files (413).
    """
    request._body = body  # Request.form() parses the cached body instead of reading the stream again
    try:
        form = await request.form(max_files=max_files + 1, max_fields=100)
    except StarletteHTTPException as e:
        if "too many files" in str(e.detail).lower() and max_files > 1:
            raise RequestError(413, "TooManyImages", f"more than {max_files} files in one request") from None
        raise InputError(f"malformed multipart/form-data body: {e.detail}") from None
    except (ValueError, KeyError, AssertionError) as e:
        raise InputError(f"malformed multipart/form-data body: {e}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        named = [v for k, v in form.multi_items() if isinstance(v, UploadFile) and k == "file"]
        if len(files) > max_files > 1:
            raise RequestError(413, "TooManyImages", f"more than {max_files} files in one request")
        if not files:
            raise InputError("multipart/form-data body has no file part (send the image as the field 'file')")
        chosen = (named or files)[:1] if max_files == 1 else files
        return [await f.read() for f in chosen]
    finally:
        await form.close()


# ---------------------------------------------------------------------------------------------------- HTTP classifier
async def classify_http(client: httpx.AsyncClient, url: str, image: np.ndarray, timeout_s: float
                        ) -> tuple[np.ndarray | None, Any]:
    """POST ``image`` ((C, H, W) in [0, 1]) as a PNG to the classifier at ``url``; (probabilities or None, label).

    ``timeout_s``: the client's timeout, named in the 504 message.

    Raises:
        RequestError: 504 (``DownstreamTimeout``) past the timeout; 502 (``DownstreamError``) when unreachable, on an
            HTTP error status, or for an answer that is not JSON or not one :func:`parse_downstream_json` accepts.
    """
    import httpx

    try:
        r = await client.post(url, content=encode_png(image), headers={"Content-Type": "image/png"})
    except httpx.TimeoutException:
        raise RequestError(504, "DownstreamTimeout", f"downstream {url} did not answer within {timeout_s} s") from None
    except httpx.HTTPError as e:
        raise RequestError(502, "DownstreamError", f"downstream {url} unreachable: {e}") from None
    if r.status_code >= 400:
        raise RequestError(502, "DownstreamError", f"downstream {url} answered {r.status_code}: {r.text[:200]}")
    try:
        data = r.json()
    except ValueError:
        raise RequestError(502, "DownstreamError", f"downstream {url} did not answer JSON") from None
    return parse_downstream_json(data, url)


def parse_downstream_json(data: Any, url: str) -> tuple[np.ndarray | None, Any]:
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
            probs = torch.softmax(t, 0) if key == "logits" else probabilities_from_output(t)[0]
            return probs.numpy(), data.get("label")
        if "label" in data:
            return None, data["label"]
    except (TypeError, ValueError) as e:
        raise RequestError(502, "DownstreamError", f"downstream {url}: bad answer: {e}") from None
    raise RequestError(502, "DownstreamError", f"downstream {url} answered without probabilities, logits or label")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) from an image header, without decoding (to report resizes); None when unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - decode_image reports the real problem
        return None


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InputError(f"downstream model returned {type(out).__name__}, expected a tensor of logits")
    return out
