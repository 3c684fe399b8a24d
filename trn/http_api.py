"""The HTTP side of the TRN service, without Ray: the FastAPI app, its schema and error bodies, request parsing.

:mod:`workers.serve` mounts :data:`api` on its Ray Serve deployment (``@serve.ingress(api)``) and adds the endpoints;
everything here is plain FastAPI / Starlette and can be reused or tested without Ray.

* errors: :class:`RequestError` becomes ``{"error": {"status", "type", "message"}}`` with its status (and headers,
  e.g. ``Retry-After``); the project's own errors map to 400 / 422 / 500;
* request bodies: :func:`read_body` (size limit on the declared and the actual length), :func:`multipart_files`
  (parsed by Starlette / python-multipart: ``UploadFile``);
* answers of an external HTTP classifier: :func:`parse_downstream_json`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile  # what Request.form() yields (fastapi.UploadFile subclasses it)
from starlette.exceptions import HTTPException as StarletteHTTPException

from trn.errors import InputError, ShapeError, TRNError
from trn.output_policy import probabilities_from_output

__all__ = [
    "NPY_TYPES",
    "NPZ_TYPES",
    "BatchClassifyResponse",
    "ClassifyResponse",
    "ErrorResponse",
    "HealthResponse",
    "RequestError",
    "api",
    "error_response",
    "first_tensor",
    "header_size",
    "multipart_files",
    "parse_downstream_json",
    "read_body",
]

NPY_TYPES = ("application/x-npy", "application/npy")
NPZ_TYPES = ("application/x-npz", "application/npz", "application/zip")


# ---------------------------------------------------------------------------------------------------- errors
class RequestError(Exception):
    """A request the service refuses: becomes a JSON error body with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


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
