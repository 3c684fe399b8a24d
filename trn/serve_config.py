"""Settings of the TRN Serve application, as frozen Pydantic models filled from YAML (no Ray import here).

Two layers, so that one set of application settings works under every launcher:

* :class:`AppArgs`: everything the application itself needs (checkpoint, batching, replicas, input limits, the
  downstream classifier, the defence stack, the output policy, the query budget and detector). It is what
  ``trn_workers.serve:build_app`` (the Ray layer) takes, what ``args:`` holds in a Ray Serve config
  file (``configs/serve_deploy.yaml``, KubeRay ``serveConfigV2``), and the ``app:`` section of ``configs/serve.yaml``.
* :class:`ServeConfig`: ``app`` plus where ``trn serve`` listens and which Ray cluster it uses. Under ``serve run``
  / ``serve deploy`` these belong to the Serve config file's ``http_options`` instead.

Pydantic does the parsing and type checks (``build_app(args: AppArgs)`` is Ray's typed application-builder pattern:
``serve run`` / ``serve deploy`` validate ``args`` with :class:`AppArgs` before calling it). Our own loaders turn its
errors into one :class:`~trn.errors.ConfigError` line naming the option, before anything starts.

    >>> cfg = load_serve_config("configs/serve.yaml", ["app.max_batch_size=16"])
    >>> cfg.app.max_batch_size
    16
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trn.config import parse_override, read_yaml_mapping
from trn.defenses.spec import canonical_defenses, map_trn_checkpoints, serving_defenses, split_defenses
from trn.errors import ConfigError
from trn.output_policy import OutputPolicy

__all__ = [
    "DOWNSTREAM_KINDS",
    "AppArgs",
    "AutoscalingArgs",
    "DownstreamArgs",
    "QueryBudgetArgs",
    "QueryDetectorArgs",
    "ServeConfig",
    "app_args_from_mapping",
    "load_serve_config",
]

DOWNSTREAM_KINDS = ("none", "guard", "checkpoint", "torchscript", "export", "http")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _positive(where: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class _Args(BaseModel):
    """Frozen, unknown keys refused; checks beyond types live in ``model_post_init`` and raise ConfigError."""

    model_config = ConfigDict(frozen=True, extra="forbid")


M = TypeVar("M", bound=BaseModel)


def _validate(cls: type[M], data: Any, where: str) -> M:
    """``cls.model_validate(data)`` with Pydantic's errors as one ConfigError line (``where.option: message``)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in (where, *err.get("loc", ())) if x != "")
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = f"unknown option {loc}"
                parts.append(msg)
                continue
            if err.get("type") == "value_error" and isinstance((err.get("ctx") or {}).get("error"), ConfigError):
                parts.append(str(err["ctx"]["error"]))
                continue
            parts.append(f"{loc}: {msg}")
        raise ConfigError("; ".join(dict.fromkeys(parts))) from None


class AutoscalingArgs(_Args):
    """Ray Serve ``autoscaling_config`` for the restorer (replaces a fixed ``num_replicas``)."""

    min_replicas: int = 1  # 0 allows scale-to-zero (first request then waits for a cold start)
    max_replicas: int = 4
    # Ongoing requests per replica the autoscaler aims for. With batching, about half of max_batch_size keeps batches
    # full before a replica is added.
    target_ongoing_requests: float = 16.0
    initial_replicas: int | None = None
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0

    def model_post_init(self, context: Any, /) -> None:
        _positive("autoscaling.min_replicas", self.min_replicas, allow_zero=True)
        _positive("autoscaling.max_replicas", self.max_replicas)
        _positive("autoscaling.target_ongoing_requests", self.target_ongoing_requests)
        _positive("autoscaling.upscale_delay_s", self.upscale_delay_s, allow_zero=True)
        _positive("autoscaling.downscale_delay_s", self.downscale_delay_s, allow_zero=True)
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"autoscaling.min_replicas ({self.min_replicas}) is above max_replicas "
                              f"({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ConfigError(f"autoscaling.initial_replicas ({self.initial_replicas}) must lie in "
                              f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DownstreamArgs(_Args):
    """The classifier that ``POST /v1/classify`` forwards restored images to.

    kinds: ``none`` (no /v1/classify), ``guard`` (the restorer's own guard classifier, in the restorer replica),
    ``checkpoint`` (one of our safetensors classifier checkpoints), ``torchscript`` (``torch.jit.load``), ``export``
    (``torch.export.load``; export with a dynamic batch dimension, else requests run one at a time) - these three run
    in their own batched deployment - or ``http`` (POST the restored PNG to ``url``, expect JSON back).
    TorchScript and exported programs are code: load only files you trust.
    """

    kind: Literal["none", "guard", "checkpoint", "torchscript", "export", "http"] = "guard"
    path: str | None = None  # checkpoint / torchscript / export file
    url: str | None = None  # http: endpoint receiving image/png, answering JSON with logits|probabilities|label
    timeout_s: float = 5.0  # http: whole-request timeout (-> 504 past it)
    class_names: list[str] | None = None  # default: the checkpoint's, else the restorer's when the count matches
    device: str = "auto"
    num_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float | None = None  # None: 0.5 per replica (sharing a GPU with a restorer) if the cluster has GPUs
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005

    def model_post_init(self, context: Any, /) -> None:
        if self.kind in ("checkpoint", "torchscript", "export") and not self.path:
            raise ConfigError(f"downstream.path is required when downstream.kind is {self.kind!r}")
        if self.kind == "http":
            if not self.url:
                raise ConfigError("downstream.url is required when downstream.kind is 'http'")
            if not self.url.startswith(("http://", "https://")):
                raise ConfigError(f"downstream.url must start with http:// or https://, got {self.url!r}")
        _positive("downstream.timeout_s", self.timeout_s)
        _positive("downstream.num_replicas", self.num_replicas)
        _positive("downstream.num_cpus", self.num_cpus, allow_zero=True)
        _positive("downstream.num_gpus", self.num_gpus, allow_zero=True)
        _positive("downstream.max_batch_size", self.max_batch_size)
        _positive("downstream.batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)

    @property
    def deployed(self) -> bool:
        """Whether this downstream runs as its own Serve deployment."""
        return self.kind in ("checkpoint", "torchscript", "export")


class QueryBudgetArgs(_Args):
    """Per-client query budget (:class:`trn.query_budget.QueryBudget`): a token bucket per API key, else per client
    address. A batch request costs one query per image. Past the budget: 429 with ``Retry-After``. Where the buckets
    live: ``app.client_state`` (per replica, or shared by every replica)."""

    rate: float = 10.0  # queries per second refilled per client
    burst: int = 100  # queries a client may send at once (also the largest batch it can send)
    total: int | None = None  # lifetime cap per client (a query-attack budget); None: none
    key_header: str = "x-api-key"  # header holding the client's key; absent: the client's address is the key

    def model_post_init(self, context: Any, /) -> None:
        _positive("query_budget.rate", self.rate)
        _positive("query_budget.burst", self.burst)
        _positive("query_budget.total", self.total)
        if not self.key_header or not isinstance(self.key_header, str):
            raise ConfigError(f"query_budget.key_header must be a header name, got {self.key_header!r}")


class QueryDetectorArgs(_Args):
    """Similar-query detector (:class:`trn.query_detector.QueryDetector`, Blacklight-style) on ``/v1/classify`` and
    ``/v1/classify/batch``: each client's images are fingerprinted (hashes of quantised windows) and a client whose
    queries keep nearly repeating its earlier ones (a score-based query attack such as Square) is refused: 429 with
    ``Retry-After`` for ``cooldown_s``, or 403 for good. Clients are keyed like the query budget (its ``key_header``
    when set, else ``x-api-key``; no key: the client's address). Where its state lives: ``app.client_state``."""

    window: int = 8  # side of the hashed windows (stride 1, all channels; clamped to the image size)
    step: int = 50  # quantisation step of the 8-bit pixel values (50: six levels, as in the paper)
    top: int = 50  # hashes per fingerprint (the largest)
    match_threshold: int = 15  # shared hashes that make two queries "the same" (<= top)
    max_similar: int = 5  # matching queries a client may send among its last `history` before it is refused
    cooldown_s: float | None = 3600.0  # seconds refused once over max_similar; None: refused for good (403)
    history: int = 1000  # queries remembered per client (400 kB per client at top 50)
    max_clients: int = 1000  # clients remembered per replica; the least recently seen are forgotten first

    def model_post_init(self, context: Any, /) -> None:
        from trn.query_detector import QueryDetector  # numpy only; its constructor is where the ranges are checked

        QueryDetector(**self.model_dump())


class AppArgs(_Args):
    """Arguments of ``trn_workers.serve:build_app`` (the ``args:`` of a Serve config file).

    Validated from a mapping as Serve hands it over: typed YAML from a config file, or ``key=value`` strings from
    ``serve run`` (see :func:`app_args_from_mapping`; dotted keys reach sections, ``config=`` starts from a file).
    """

    @model_validator(mode="before")
    @classmethod
    def _from_serve_args(cls, data: Any) -> Any:
        return _expand_args(data) if isinstance(data, Mapping) else data

    restorer: str = "checkpoints/trn_fmnist_agnostic"  # restorer checkpoint (NAME.safetensors + NAME.json)
    device: str = "auto"  # auto: cuda when the replica was given a GPU, else cpu
    # Dynamic batching (@serve.batch): a batch runs when max_batch_size requests wait or the oldest has waited
    # batch_wait_timeout_s. Both can be changed live (they travel as the deployment's user_config).
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    # Requests one restorer replica holds at once; must be >= max_batch_size or batches never fill.
    # None: 2 * max_batch_size (one batch running, one filling), at least 32: when every replica is full, Serve's
    # router backs off and retries, and a small limit collapses throughput (max_batch_size 1 with a limit of 2:
    # 9 req/s at 32 clients against 90 with 64, benchmarks/bench_serve.py on 2 cores).
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 1024  # per caller, beyond which requests get 503 (load shedding); -1: no limit
    num_replicas: int = 1  # ignored when autoscaling is set
    autoscaling: AutoscalingArgs | None = None
    num_cpus: float = 1.0  # Ray logical CPUs per restorer replica (also its torch thread count, see torch_threads)
    num_gpus: float | None = None  # None: 1 per replica if the cluster has GPUs (0.5 with a deployed downstream)
    torch_threads: int | None = None  # None: max(1, int(num_cpus))
    health_check_period_s: float = 10.0
    # Input limits, enforced in the ingress (the HTTP handlers) before anything reaches the model.
    max_body_bytes: int = 1 << 20  # 413 above this (Content-Length header and bytes actually received)
    max_pixels: int = 1 << 22  # width*height from the image header, checked before decoding (bombs) -> 400
    resize: Literal["reject", "resize"] = "reject"  # off-size images: 422, or bilinear resize (reported in a header)
    channel_policy: Literal["reject", "convert"] = "reject"  # grey<->RGB mismatch: 422, or convert
    downstream: DownstreamArgs = Field(default_factory=DownstreamArgs)
    # Defence stack (trn.defenses.stack), e.g. [{name: jpeg, quality: 50}, trn, {name: gcm}]. The input side
    # (jpeg, bit_depth, median, gaussian_blur, trn, in order) answers /v1/restore and feeds /v1/classify; classifier
    # wrappers (gcm, unig) wrap the downstream classifier, so they need one that runs as a torch module (guard,
    # checkpoint, torchscript, export). A trn entry without its own checkpoint is `restorer`, which also sets the image
    # size. None: [trn], the restorer alone.
    defenses: Any = None  # checked (and made canonical) by trn.defenses.spec in model_post_init
    # What /v1/classify returns (trn.output_policy): label (the default: no scores for score-based query attacks to
    # read; docs/deploy.md), top_k (k classes), rounded (every class, `decimals` decimals) or full. A request may ask
    # for less (?output=label, ?output=top_k&k=1, ?output=rounded&decimals=1), never more (403).
    output: OutputPolicy = Field(default_factory=lambda: OutputPolicy("label"))
    query_budget: QueryBudgetArgs | None = None  # None: no per-client limit
    # Refuse clients whose classify queries keep nearly repeating earlier ones (query attacks); None: off.
    query_detector: QueryDetectorArgs | None = None
    # Where the query budget's buckets and the detector's history live: in each restorer replica ("replica": no extra
    # hop, but with R replicas a client gets up to R times the budget and its queries are split across R histories),
    # or in one small deployment every replica asks ("shared": exact per client whatever the replica count, one
    # in-cluster call per request). "auto": shared when there can be more than one replica (num_replicas, or the
    # autoscaling max_replicas, > 1), else replica.
    client_state: Literal["auto", "replica", "shared"] = "auto"
    max_batch_images: int = 256  # images in one /v1/*/batch request (413 above)

    def model_post_init(self, context: Any, /) -> None:
        if not self.restorer:
            raise ConfigError("restorer (a checkpoint path) is required")
        _positive("max_batch_size", self.max_batch_size)
        _positive("batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)
        _positive("max_ongoing_requests", self.max_ongoing_requests)
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                              f"({self.max_batch_size}): batches could never fill")
        if self.max_queued_requests != -1:
            _positive("max_queued_requests", self.max_queued_requests)
        _positive("num_replicas", self.num_replicas)
        _positive("num_cpus", self.num_cpus, allow_zero=True)
        _positive("num_gpus", self.num_gpus, allow_zero=True)
        _positive("torch_threads", self.torch_threads)
        _positive("health_check_period_s", self.health_check_period_s)
        _positive("max_body_bytes", self.max_body_bytes)
        _positive("max_pixels", self.max_pixels)
        _positive("max_batch_images", self.max_batch_images)
        if self.defenses is not None:
            _, wrappers = split_defenses(serving_defenses(canonical_defenses(self.defenses, "app.defenses")))
            if wrappers and self.downstream.kind in ("http", "none"):
                raise ConfigError(
                    f"defenses: the classifier wrapper(s) {[w['name'] for w in wrappers]} wrap the downstream "
                    f"classifier, but downstream.kind is {self.downstream.kind!r}, which "
                    + ("runs outside this service" if self.downstream.kind == "http" else "means no classifier")
                    + "; use downstream.kind guard, checkpoint, torchscript or export, or list only input-side "
                    "defences (jpeg, bit_depth, median, gaussian_blur, trn)")

    @property
    def shared_client_state(self) -> bool:
        """Whether the budget / detector state lives in one deployment for every replica (see ``client_state``)."""
        if self.query_budget is None and self.query_detector is None:
            return False
        if self.client_state == "auto":
            return (self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas) > 1
        return self.client_state == "shared"

    @property
    def restorer_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 32)

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def with_resolved_paths(self) -> AppArgs:
        """Make checkpoint/model paths absolute (replicas may run in another working directory), and ``defenses``
        canonical (plain data, aliases resolved: what travels to the replicas).

        A relative path is looked up in the current directory, then in the repository root.

        Raises:
            ConfigError: a path that exists in neither place.
        """
        restorer = _resolve(self.restorer, "restorer", (".safetensors",))
        ds = self.downstream
        if ds.path:
            suffixes = (".safetensors",) if ds.kind == "checkpoint" else ("",)
            ds = ds.model_copy(update={"path": _resolve(ds.path, "downstream.path", suffixes)})
        defenses = self.defenses
        if defenses is not None:
            defenses = map_trn_checkpoints(
                serving_defenses(canonical_defenses(defenses, "defenses")),
                lambda i, path: _resolve(path, f"defenses[{i}] (trn) checkpoint", (".safetensors",)))
            defenses = map_trn_checkpoints(
                defenses, lambda i, path: _resolve(path, f"defenses[{i}] (trn) map_from", (".safetensors", "")),
                key="map_from")
            defenses = map_trn_checkpoints(
                defenses, lambda i, path: _resolve(path, f"defenses[{i}] (trn) fallback", (".safetensors",)),
                key="fallback")
        return self.model_copy(update={"restorer": restorer, "downstream": ds, "defenses": defenses})


def _resolve(path: str, where: str, suffixes: tuple[str, ...]) -> str:
    p = Path(os.path.expanduser(path))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        stem = c.with_suffix("") if c.suffix in (".safetensors", ".json") and suffixes != ("",) else c
        if any(Path(str(stem) + s).is_file() for s in suffixes):
            return str(stem.resolve())
    shown = " or ".join(str(c) + (suffixes[0] if suffixes != ("",) else "") for c in candidates)
    raise ConfigError(f"{where}: file not found: {shown}")


class ServeConfig(_Args):
    """``trn serve --config``: the application plus where it listens (configs/serve.yaml)."""

    app: AppArgs = Field(default_factory=AppArgs)
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines' requests
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "trn"
    ray_address: str | None = None  # None: start a local Ray; "auto" or ray://...: join that cluster
    ray_num_cpus: int | None = None  # CPUs a locally started Ray may use (None: all)

    def model_post_init(self, context: Any, /) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must lie in [0, 65535], got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        _positive("ray_num_cpus", self.ray_num_cpus)


def load_serve_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """Read configs/serve.yaml-style YAML plus ``key=value`` overrides (``app.max_batch_size=8``).

    Raises:
        ConfigError: a missing / invalid file, or a bad option (named).
    """
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    where = str(path) if path else "config"
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value, f"override {text!r}")
    return _validate(ServeConfig, data, where)


def app_args_from_mapping(args: Mapping[str, Any] | None) -> AppArgs:
    """Build :class:`AppArgs` from the ``args`` Ray Serve hands an application builder.

    From a Serve config file the values are typed YAML; from ``serve run trn_workers.serve:build_app key=value`` they
    are strings, read as YAML like ``trn --set`` (so ``max_batch_size=8`` is an int). Dotted keys reach sections
    (``downstream.kind=http``). The key ``config`` names a ``configs/serve.yaml``-style file whose ``app:`` section
    is the starting point.

    Raises:
        ConfigError: unknown option, wrong type or bad value, with its name.
    """
    return _validate(AppArgs, dict(args or {}), "app")


def _set_dotted(data: dict, keys: list[str], value: Any, what: str) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {k} is not a section")
    last = keys[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = _merge(node[last], value)
    else:
        node[last] = value


def _expand_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Serve's builder args as AppArgs data: ``config=`` base, YAML-read strings, dotted keys into sections."""
    args = dict(args)
    data: dict[str, Any] = {}
    if "config" in args:
        data = load_serve_config(args.pop("config")).app.model_dump()
    for key, value in args.items():
        if not isinstance(key, str):
            raise ConfigError(f"application args: keys must be strings, got {key!r}")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError as e:
                raise ConfigError(f"application arg {key}={value!r} is not valid YAML: {e}") from e
        _set_dotted(data, key.split("."), value, f"application arg {key!r}")
    return data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
