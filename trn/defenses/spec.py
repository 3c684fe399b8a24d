"""Defence stack specs as plain data: one spec for ``trn sanitize --defenses`` and the service's ``app.defenses``.

A spec is the list :mod:`trn.defenses.stack` composes, e.g.
``[{name: jpeg, quality: 50}, {name: trn, checkpoint: checkpoints/trn_fmnist}, {name: gcm}]``: input-side stages
(``jpeg``, ``bit_depth``, ``median``, ``gaussian_blur``, ``trn``) first, then classifier wrappers (``gcm``, ``unig``).
A ``trn`` entry's ``map_from: CLASSIFIER`` (trn checkpoint, TorchScript or ``torch.export`` file) estimates its
gradient map from that classifier instead of the restorer's guard: the downstream classifier itself, when it runs
where the restorer runs (on a cluster the file must be on a shared filesystem, like the job's data).
This module adds what a distributed job or a service needs on top of :mod:`trn.defenses.stack` (no Ray here):

* reading the spec from a YAML file or an inline YAML/JSON string (the CLI's ``--defenses SPEC``);
* insisting on plain JSON data, because the spec travels to Ray actors and replicas and is recorded in the job's
  metadata (a tensor of UniG reference images would be pickled: use ``reference_dataset`` instead);
* a canonical form (aliases resolved, bare names turned into ``{name: ...}``), so that two spellings of one stack
  compare equal when a job checks whether it may resume;
* the split into the input side (what the restorer actors / replicas apply) and the classifier wrappers.

    >>> spec = load_defense_spec("[{name: bit_depth, bits: 4}, trn, gcm]")
    >>> spec
    [{'name': 'bit_depth', 'bits': 4}, {'name': 'trn'}, {'name': 'gcm'}]
    >>> describe_defenses(spec)
    'bit_depth(bits=4) -> trn -> gcm -> classifier'

``None`` (no option) means :func:`default_defenses`, ``[trn]``: the restorer alone, as before stacks existed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from trn.defenses.stack import CLASSIFIER_WRAPPERS, parse_defense_spec
from trn.errors import ConfigError

__all__ = [
    "canonical_defenses",
    "default_defenses",
    "describe_defenses",
    "load_defense_spec",
    "map_trn_checkpoints",
    "serving_defenses",
    "split_defenses",
    "uses_default_restorer",
]
log = logging.getLogger(__name__)

_EXAMPLE = "[{name: bit_depth, bits: 4}, trn, {name: gcm}]"


def default_defenses() -> list[dict[str, Any]]:
    """The stack used when none is given: the TRN restorer alone (``[trn]``)."""
    return [{"name": "trn"}]


def canonical_defenses(spec: Any, where: str = "defenses") -> list[dict[str, Any]]:
    """Check ``spec`` and return it as plain JSON data: ``[{"name": canonical name, **params}, ...]``.

    Args:
        spec: a list of entries (mappings with a ``name``, or bare names).
        where: the option's name, at the start of every error message.

    Raises:
        ConfigError: not a list, not plain JSON data, or anything :func:`~trn.defenses.stack.parse_defense_spec`
            refuses (unknown defence or parameter, wrapper before an input-side stage).
    """
    if isinstance(spec, (str, bytes, dict)) or not isinstance(spec, Sequence):
        raise ConfigError(f"{where}: expected a list of defences like {_EXAMPLE}, got {type(spec).__name__} "
                          f"{spec!r}")
    try:
        plain = json.loads(json.dumps(list(spec), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: the spec must be plain data (strings, numbers, booleans, lists, mappings) "
                          f"because it travels to Ray workers and into the job's metadata; {e} (give UniG reference "
                          "images as reference_dataset, not as a tensor)") from e
    try:
        parsed = parse_defense_spec(plain)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    if not parsed:
        log.warning("%s: an empty defence list: images pass through unchanged", where)
    return [{"name": name, **params} for name, params in parsed]


def load_defense_spec(spec: str | os.PathLike | Sequence[Any] | None,
                      where: str = "--defenses") -> list[dict[str, Any]] | None:
    """Read a spec given as a YAML file, an inline YAML/JSON list, or the list itself; canonical form out.

    A string naming an existing file is read as YAML; any other string is parsed as YAML (so JSON works too). The
    YAML may hold the list itself or a mapping ``{defenses: [...]}``.

    Args:
        spec: file path, inline text (``'[{name: bit_depth, bits: 4}, trn]'``), a list, or None.
        where: the option's name, at the start of every error message.

    Returns:
        The canonical list (see :func:`canonical_defenses`), or None when ``spec`` is None (use the default stack).

    Raises:
        ConfigError: a missing file, invalid YAML, or a spec :func:`canonical_defenses` refuses.
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        path = Path(os.path.expanduser(text))
        if isinstance(spec, os.PathLike) or path.is_file():
            if not path.is_file():
                raise ConfigError(f"{where}: file not found: {path}")
            source, text = str(path), path.read_text()
        elif not text.strip():
            raise ConfigError(f"{where}: empty; give a YAML file or an inline list like {_EXAMPLE!r}")
        else:
            source = "inline spec"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: {source} is not valid YAML/JSON: {e}") from e
        if isinstance(data, dict) and set(data) == {"defenses"}:
            data = data["defenses"]
        if source == "inline spec" and not isinstance(data, list):
            raise ConfigError(f"{where}: {text!r} is neither an existing file nor an inline list of defences "
                              f"like {_EXAMPLE!r}")
        spec = data
        where = f"{where} ({source})"
    return canonical_defenses(spec, where)


def split_defenses(spec: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(input-side entries, classifier-wrapper entries) of a canonical spec, each in the listed order."""
    wrappers = [dict(e) for e in spec if e["name"] in CLASSIFIER_WRAPPERS]
    return [dict(e) for e in spec if e["name"] not in CLASSIFIER_WRAPPERS], wrappers


def uses_default_restorer(spec: Sequence[dict[str, Any]]) -> bool:
    """Whether some ``trn`` entry has no ``checkpoint`` of its own (it then uses the job's / service's restorer)."""
    return any(e["name"] == "trn" and e.get("checkpoint") is None for e in spec)


def map_trn_checkpoints(spec: Sequence[dict[str, Any]], fn: Callable[[int, str], str],
                        key: str = "checkpoint") -> list[dict[str, Any]]:
    """A copy of ``spec`` with each ``trn`` entry's ``key`` path (its ``checkpoint``, the ``map_from`` classifier
    or the ``fallback`` checkpoint) replaced by ``fn(index, path)``.

    Raises:
        ConfigError: a path that is not a string.
    """
    out = []
    for i, entry in enumerate(spec):
        entry = dict(entry)
        path = entry.get(key)
        if entry["name"] == "trn" and path is not None:
            if not isinstance(path, str) or not path:
                raise ConfigError(f"defence #{i} (trn): {key} must be a path, got {path!r}")
            entry[key] = fn(i, path)
        out.append(entry)
    return out


def describe_defenses(spec: Sequence[dict[str, Any]] | None, classifier: str = "classifier") -> str:
    """One line in :meth:`~trn.defenses.stack.DefenseStack.describe`'s format: ``jpeg(quality=75) -> trn -> gcm ->
    classifier``; ``None`` describes the default stack."""
    spec = default_defenses() if spec is None else spec
    parts = []
    for entry in spec:
        params = {k: v for k, v in entry.items() if k != "name"}
        parts.append(entry["name"] + (f"({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""))
    return " -> ".join([*parts, classifier]) if parts else f"{classifier} (no defence)"


def serving_defenses(spec: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A canonical spec made fit for a service that answers many clients: ``unig`` entries run in the serving mode
    (``per_sample: true, deterministic: true``: each answer depends on its own image only, the same image gets the same
    answer) and must name their reference images (``reference_dataset``), which are stored with the application.

    Raises:
        ConfigError: a ``unig`` entry without ``reference_dataset``, or one that sets ``per_sample: false``.
    """
    out = []
    for i, entry in enumerate(spec):
        entry = dict(entry)
        if entry["name"] == "unig":
            if entry.get("per_sample") is False or entry.get("deterministic") is False:
                raise ConfigError(f"defenses: defence #{i} (unig): a service runs UniG per request (per_sample and "
                                  "deterministic true); a batch-wide UniG would mix other clients' images into "
                                  "each answer")
            if not entry.get("reference_dataset"):
                raise ConfigError(f"defenses: defence #{i} (unig): a service needs fixed reference images; add "
                                  "reference_dataset (e.g. fashion-mnist; num_reference and seed pick the images)")
            entry.setdefault("per_sample", True)
            entry.setdefault("deterministic", True)
        out.append(entry)
    return out
