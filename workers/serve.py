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
(label, plus as many probabilities as the app's output policy allows: :mod:`trn.output_policy`), their batch forms
``POST /v1/restore/batch`` and ``POST /v1/classify/batch`` (many images in one request: multipart files or an .npz),
``GET /healthz``, ``GET /docs`` / ``GET /openapi.json``. An optional per-client query budget answers 429 with
``Retry-After`` (:mod:`trn.query_budget`), an optional similar-query detector refuses query attacks on the classify
endpoints (:mod:`trn.query_detector`); their state lives in each replica or, shared by all of them, in the app's
``ClientState`` deployment (``app.client_state``); their counters are Ray metrics.

Launch it with ``trn serve --config configs/serve.yaml``, ``serve run trn_workers.serve:build_app restorer=...`` or
``serve deploy configs/serve_deploy.yaml`` (see docs/deploy.md). Only the Ray part lives here (deployments,
``@serve.batch``, the app builder, ``trn serve``); the settings (:mod:`trn.serve_config`, Pydantic), the HTTP schema,
parsing, output policy of a request and external classifier (:mod:`trn.http_api`), the budget's keys and 429s
(:mod:`trn.query_budget`), the detector (:mod:`trn.query_detector`) and both as one call (:mod:`trn.client_screen`),
decoding, model loading, build-time checks and the defence split (:mod:`trn.serving`) are library code that never
imports Ray.
"""

import asyncio
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from trn.client_screen import BUDGET_METRIC, DETECTOR_METRIC, ClientScreen, Count
from trn.defenses.spec import default_defenses, describe_defenses
from trn.errors import ConfigError, RequestError
from trn.http_api import (
    _BATCH_BODY,
    _ERRORS,
    _REQUEST_BODY,
    BatchClassifyResponse,
    ClassifyResponse,
    ErrorResponse,
    HealthResponse,
    api,
    body_format,
    classify_http,
    decode_images,
    first_tensor,
    multipart_files,
    output_query,
    read_body,
    request_policy,
)
from trn.imageio import encode_png
from trn.output_policy import OutputPolicy, format_prediction, probabilities_from_output
from trn.query_budget import QueryBudget, client_key
from trn.query_detector import QueryDetector
from trn.serve_config import AppArgs, DownstreamArgs, ServeConfig, app_args_from_mapping, load_serve_config
from trn.serving import build_service_defenses, output_class_names, service_info, wrap_classifier
from trn.serving import load_downstream_model as _load_model

__all__ = ["ClientState", "DownstreamClassifier", "TRNService", "api", "build_app", "load_downstream_model",
           "run_serve_command"]

log = logging.getLogger(__name__)

SERVICE_NAME = "TRNService"
DOWNSTREAM_NAME = "DownstreamClassifier"


# ---------------------------------------------------------------------------------------------------- helpers
def _pick_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    import ray

    # In a replica: only the GPUs Ray assigned to it. Outside Ray (tests, scripts): whatever torch sees.
    has_gpu = bool(ray.get_gpu_ids()) if ray.is_initialized() else True
    return torch.device("cuda" if has_gpu and torch.cuda.is_available() else "cpu")


def _cluster_has_gpus() -> bool:
    """GPUs in the Ray cluster (connected), else on this machine (``serve run`` builds the app before ray.init)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


def load_downstream_model(ds: DownstreamArgs, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The downstream classifier named by ``ds`` (:func:`trn.serving.load_downstream_model`)."""
    return _load_model(ds.kind, ds.path, device)


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
        self.model = wrap_classifier(self.model, defenses, f"the {ds.kind} downstream {ds.path}")
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
                    return list(probabilities_from_output(first_tensor(self.model(x))).cpu().numpy())
                except (RuntimeError, AssertionError) as e:
                    if self.ds.kind != "export" or len(images) == 1:
                        raise
                    log.warning("exported program refused a batch of %d (%s); running one image at a time - export "
                                "it with a dynamic batch dimension for batching", len(images), e)
                    self.per_item = True
            return [probabilities_from_output(first_tensor(self.model(x[i : i + 1]))).cpu().numpy()[0] for i in range(len(x))]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(C, H, W) float32 image in [0, 1] -> (num_classes,) probabilities; batched across callers."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._forward, images)

    def check_health(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA device lost")


@serve.deployment(name="ClientState", num_replicas=1, ray_actor_options={"num_cpus": 0})
class ClientState:
    """The query budget and detector state of an app, shared by all its restorer replicas (``client_state: shared``):
    one replica, so a client's buckets and query history do not depend on which restorer replica it reached.
    Screening (hashing included) runs in a worker thread, off this replica's event loop."""

    def __init__(self, args: AppArgs) -> None:
        self.screen_state = _client_screen(args)

    async def screen(self, key: str, n: int, images: np.ndarray | None) -> tuple[list[Count], Any]:
        return await asyncio.to_thread(self.screen_state.screen, key, n, images)


def _client_screen(args: AppArgs) -> ClientScreen:
    qb, qd = args.query_budget, args.query_detector
    return ClientScreen(QueryBudget(qb.rate, qb.burst, qb.total) if qb else None,
                        QueryDetector(**qd.model_dump()) if qd else None)


@serve.deployment(name=SERVICE_NAME)
@serve.ingress(api)
class TRNService:
    """HTTP ingress + batched restorer (one replica: FastAPI handlers and one model copy).

    The "restorer" is the input side of the defence stack (``args.defenses``; default ``[trn]``); with
    ``downstream.kind: guard`` the stack's classifier wrappers wrap the guard that answers ``/v1/classify``.
    """

    def __init__(self, args: AppArgs, info: dict, downstream: DeploymentHandle | None = None,
                 client_state: DeploymentHandle | None = None) -> None:
        from trn.restorer import Restorer

        torch.set_num_threads(args.threads)
        self.args, self.info, self.downstream = args, info, downstream
        self.device = _pick_device(args.device)
        self.restorer = Restorer.load(args.restorer, self.device)
        self.channels, self.height, self.width = (int(v) for v in self.restorer.image_shape)
        spec = default_defenses() if args.defenses is None else args.defenses
        self.preprocessor, self.classifier = build_service_defenses(spec, self.restorer, args.downstream.kind, self.device)
        self.defenses = describe_defenses(spec)
        self.class_names = list(self.restorer.class_names)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="trn-restore")  # the model runs here, off the loop
        self._fatal: str | None = None
        self._http = None
        if args.downstream.kind == "http":
            import httpx

            self._http = httpx.AsyncClient(timeout=args.downstream.timeout_s)
        self._batch_params = (args.max_batch_size, args.batch_wait_timeout_s)
        # per-client screening: here (one replica's view) or in the app's ClientState deployment (every replica's)
        self.client_state = client_state
        self.screen_state = _client_screen(args) if client_state is None else None
        self.key_header = args.query_budget.key_header if args.query_budget else "x-api-key"
        self._metrics: dict[str, Any] = {}
        try:
            from ray.util.metrics import Counter

            self._metrics[BUDGET_METRIC] = Counter(
                BUDGET_METRIC, description="images charged to (or refused by) the per-client query budget",
                tag_keys=("outcome",))
            self._metrics[DETECTOR_METRIC] = Counter(
                DETECTOR_METRIC, description="classify images screened by the similar-query detector "
                "(outcome: passed, similar = passed but matching an earlier query of the client, refused)",
                tag_keys=("outcome",))
        except Exception:
            log.debug("Ray metrics unavailable", exc_info=True)
        log.info("restorer %s on %s, image shape %s, defences %s, output %s", args.restorer, self.device,
                 self.restorer.image_shape, self.defenses, self.args.output.describe())

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
                probs = probabilities_from_output(self.classifier(y)).cpu().numpy() if any(want_logits) else None
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
    async def _charge(self, request: Request, n: int, images: list[np.ndarray] | None = None) -> None:
        """Charge ``n`` queries to the caller's budget (:func:`trn.query_budget.charge_request`), then screen
        ``images`` (classify endpoints) with the detector (:func:`trn.query_detector.screen_request`), both counted
        as Ray metrics; 429 (or 403: refused for good) when either says no."""
        if self.args.query_budget is None and self.args.query_detector is None:
            return
        host = request.client.host if request.client else None
        key = client_key(request.headers, self.key_header, host)
        # only the detector reads pixels: a budget-only screen gets none (nothing to stack or ship to ClientState)
        stacked = np.stack(images) if images is not None and self.args.query_detector is not None else None
        if self.client_state is not None:
            counts, refusal = await self.client_state.screen.remote(key, n, stacked)
        else:
            counts, refusal = await asyncio.to_thread(self.screen_state.screen, key, n, stacked)  # off the loop
        for name, k, outcome in counts:
            self._count(name, k, outcome)
        if refusal is not None:
            raise refusal

    def _count(self, name: str, n: int, outcome: str) -> None:
        counter = self._metrics.get(name)
        if counter is not None and n > 0:
            try:
                counter.inc(n, tags={"outcome": outcome})
            except Exception:
                log.debug("metrics update failed", exc_info=True)

    async def _images_from_request(self, request: Request, batch: bool
                                   ) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
        """Decoded (C, H, W) images of a request (one, or up to max_batch_images for the batch endpoints), each with
        the (H, W) it was resized from (or None): :func:`trn.http_api.decode_images`, off the event loop."""
        body = await read_body(request, self.args.max_body_bytes)
        fmt = body_format(request.headers.get("content-type", ""), batch)
        limit = self.args.max_batch_images if batch else 1
        parts = await multipart_files(request, body, limit) if fmt == "multipart" else [body]
        shape = (self.channels, self.height, self.width)
        return await asyncio.to_thread(decode_images, parts, fmt, self.args, shape)

    @api.get("/healthz", response_model=HealthResponse, summary="Liveness and settings of this replica")
    async def healthz(self) -> HealthResponse:
        if self._fatal:
            raise RequestError(503, "Unhealthy", self._fatal)
        mbs, wait = self._batch_params
        return HealthResponse(status="ok", restorer=Path(self.args.restorer).name,
                              image_shape=[self.channels, self.height, self.width], device=str(self.device),
                              downstream=self.args.downstream.kind, defenses=self.defenses,
                              output=self.args.output.describe(), max_batch_size=mbs, batch_wait_timeout_s=wait)

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
        ((image, resized_from),) = await self._images_from_request(request, batch=False)
        await self._charge(request, 1)
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
        "/v1/restore/batch",
        summary="Restore many images in one request",
        response_class=Response,
        responses={200: {"content": {"application/x-npy": {}},
                         "description": "float32 (N, C, H, W) tensor of the restored images, in the order sent"},
                   **_ERRORS},
        openapi_extra=_BATCH_BODY,
    )
    async def restore_batch(self, request: Request) -> Response:
        items = await self._images_from_request(request, batch=True)
        await self._charge(request, len(items))
        outs = await asyncio.gather(*(self._restore_batch(img, False) for img, _ in items))
        buf = io.BytesIO()
        np.save(buf, np.stack([o[0] for o in outs]).astype(np.float32), allow_pickle=False)
        return Response(buf.getvalue(), media_type="application/x-npy",
                        headers={"X-TRN-Batch-Size": str(max(o[2] for o in outs))})

    async def _classify_one(self, image: np.ndarray, resized_from: tuple[int, int] | None,
                            policy: OutputPolicy) -> tuple[dict[str, Any], int]:
        kind = self.args.downstream.kind
        restored, probs, batch = await self._restore_batch(image, kind == "guard")
        if kind == "http":
            ds = self.args.downstream
            probs, label = await classify_http(self._http, ds.url, restored, ds.timeout_s)
        elif kind != "guard":
            probs, label = np.asarray(await self.downstream.classify.remote(restored)), None
        else:
            label = None
        if probs is None:  # an HTTP endpoint that answered only a label
            body = {"label": str(label), "index": -1, "probabilities": None, "output": "label"}
        else:
            names = output_class_names(len(probs), self.info.get("downstream_class_names"), self.class_names, kind)
            body = format_prediction(probs, names, policy)
        body |= {"classifier": kind, "resized_from": list(resized_from) if resized_from else None}
        return body, batch

    def _check_classifier(self) -> None:
        if self.args.downstream.kind == "none":
            raise RequestError(404, "NoClassifier", "this service has no downstream classifier (downstream.kind: none)")

    @api.post(
        "/v1/classify",
        summary="Restore one image, then classify it with the downstream classifier",
        response_model=ClassifyResponse,
        responses={**_ERRORS, 403: {"model": ErrorResponse, "description": "output asks for more than allowed"},
                   502: {"model": ErrorResponse, "description": "downstream failed"},
                   504: {"model": ErrorResponse, "description": "downstream timed out"}},
        openapi_extra=_REQUEST_BODY,
    )
    async def classify(
        self,
        request: Request,
        asked: tuple[str | None, int | None, int | None] = Depends(output_query),
    ) -> JSONResponse:
        self._check_classifier()
        policy = request_policy(self.args.output, *asked, len(self.class_names))
        ((image, resized_from),) = await self._images_from_request(request, batch=False)
        await self._charge(request, 1, [image])
        body, batch = await self._classify_one(image, resized_from, policy)
        return JSONResponse(body, headers={"X-TRN-Batch-Size": str(batch)})

    @api.post(
        "/v1/classify/batch",
        summary="Restore and classify many images in one request",
        response_model=BatchClassifyResponse,
        responses={**_ERRORS, 403: {"model": ErrorResponse, "description": "output asks for more than allowed"}},
        openapi_extra=_BATCH_BODY,
    )
    async def classify_batch(
        self,
        request: Request,
        asked: tuple[str | None, int | None, int | None] = Depends(output_query),
    ) -> JSONResponse:
        self._check_classifier()
        policy = request_policy(self.args.output, *asked, len(self.class_names))
        items = await self._images_from_request(request, batch=True)
        await self._charge(request, len(items), [img for img, _ in items])
        outs = await asyncio.gather(*(self._classify_one(img, rf, policy) for img, rf in items))
        return JSONResponse({"results": [b for b, _ in outs]},
                            headers={"X-TRN-Batch-Size": str(max(n for _, n in outs))})


# ---------------------------------------------------------------------------------------------------- builder
def build_app(args: AppArgs) -> Application:
    """The TRN Serve application (``serve run trn_workers.serve:build_app`` / ``import_path`` of a Serve config file).

    Ray's typed application-builder pattern: Serve validates its ``args`` (config file ``args:``, or ``key=value``
    strings from ``serve run``; dotted keys reach sections, ``config=configs/serve.yaml`` starts from that file's
    ``app:``) with the Pydantic model :class:`AppArgs` before calling this.

    Args:
        args: :class:`AppArgs` (a plain mapping is validated the same way, with errors as ConfigError).

    Raises:
        ConfigError: bad option, missing checkpoint, a downstream that does not fit the restorer, or a defence stack
            that cannot be built (checked by building it on the CPU here, before anything starts).
        CheckpointError: a checkpoint whose metadata is unreadable or of the wrong kind.
    """
    app_args = args if isinstance(args, AppArgs) else app_args_from_mapping(args)
    app_args = app_args.with_resolved_paths()
    info = service_info(app_args)  # every checkpoint, class-name and defence-stack check, before anything starts
    ds = app_args.downstream

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
    ).bind(app_args, info, downstream_app, ClientState.bind(app_args) if app_args.shared_client_state else None)


# ---------------------------------------------------------------------------------------------------- trn serve
def run_serve_command(args: Any) -> int:
    """``trn serve``: start (or join) Ray, start Serve on ``host:port``, deploy the app; block until Ctrl-C.

    ``args``: ``config`` (YAML path or None), ``set`` (``key=value`` overrides), ``address`` (Ray address or None),
    ``blocking``. Returns the exit code.

    Which Ray: ``--address``, else the config's ``ray_address``, else ``RAY_ADDRESS``; with none of them a *fresh*
    local Ray is started (``address="local"``: never the cluster Ray last recorded on this machine) and ends with this
    process, so ``--no-blocking`` only makes sense together with an address.

    Raises:
        ConfigError: bad config; or Ray could not be started / joined (one line, no traceback).
    """
    import ray

    cfg: ServeConfig = load_serve_config(getattr(args, "config", None), list(getattr(args, "set", None) or []))
    address = getattr(args, "address", None) or cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    blocking = bool(getattr(args, "blocking", True))
    build_app(cfg.app)  # config and checkpoint errors surface here, before anything starts
    started_ray = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address)
            else:
                ray.init(address="local", num_cpus=cfg.ray_num_cpus, include_dashboard=False)
                started_ray = True
        except Exception as e:  # noqa: BLE001 - Ray raises many types (ConnectionError, TimeoutError, RuntimeError)
            ray.shutdown()
            where = f"join the Ray cluster at {address!r}" if address else "start a local Ray"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"could not {where}: {type(e).__name__}: {first}") from None
    try:
        app = build_app(cfg.app)  # again, now that the cluster's GPUs are known (num_gpus defaults)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    except BaseException:
        if started_ray:  # do not leave a half-started local Ray behind
            serve.shutdown()
            ray.shutdown()
        raise
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    if blocking:
        print(f"deploying {cfg.app_name!r}; it will answer on {url} (docs: {url}/docs) once Serve logs it ready; "
              "Ctrl-C to stop", flush=True)
    try:
        # blocking=True: Serve waits until the app runs, then until Ctrl-C (KeyboardInterrupt, re-raised)
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    except KeyboardInterrupt:
        log.info("stopping %r", cfg.app_name)
    except BaseException:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        raise
    if not blocking:
        log.info("TRN service %r ready: %s/v1/restore, %s/docs (Serve keeps the HTTP options it was first started "
                 "with on a running cluster)", cfg.app_name, url, url)
        if started_ray:
            log.warning("--no-blocking with a local Ray: the service stops when this process exits; pass --address "
                        "to leave it running on a cluster")
        return 0
    try:
        serve.delete(cfg.app_name)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
