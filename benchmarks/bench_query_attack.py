"""Query attacks over HTTP against the live TRN service: each output policy and query-attack defence.

    python benchmarks/bench_query_attack.py --images 10 --queries 100          # a quick look (minutes on 2 cores)
    python benchmarks/bench_query_attack.py                                     # issue 12: 100 images, 2,500 queries
    python benchmarks/bench_query_attack.py --tiny --images 4 --queries 20      # untrained tiny model: the script works
    python benchmarks/bench_query_attack.py --cells detect:full:square,detect:full:square_sybil   # the detector

The service runs on loopback exactly as ``trn serve`` runs it (Ray Serve, TRN -> guard), one application per defence:
``none`` (TRN alone), ``aaa`` (AAA score post-processing: margin reversed, top-1 probability kept), ``aaa_c`` (AAA
with the top-1 log-odds reversed too, ``confidence_interval: 0.5``), ``rnd`` (RND input noise after TRN, seeded per image) and
``unig`` (UniG in its serving mode: per-request, reference images from the training set) and ``detect`` (TRN alone
behind the similar-query detector, ``app.query_detector`` at its defaults: :mod:`trn.query_detector`), ``detect_fb``
(the same, with ``--fallback``, by default the shipped fallback restorer trained on short Square attacks and gray-box
PGD, as the ``trn`` stage's fallback for the images the restorer changes by more than 0.06 RMS:
:mod:`trn.defenses.fallback`). Each app allows ``full`` output; each cell asks for its output policy per request
(``?output=...``), as a client may.

Attacks (the attacker only talks HTTP, one ``POST /v1/classify/batch`` carries every image of one attack step):

* ``square``: Square (Andriushchenko et al. 2020), Linf ``--eps``, ``--queries`` queries per image, the
  implementation of :class:`trn.attacks.Square` driven through an HTTP "model" whose scores are the log of the
  returned probabilities (classes not returned count as 0; ``label`` returns a one-hot: the search is blind);
* ``rays``: RayS (Chen & Gu, KDD 2020), label-only, Linf, same query budget;
* adaptive variants: ``square_eot`` averages the probabilities of ``--eot`` jittered copies of each candidate
  (+-2.5/255 noise: a new image at 8-bit precision, hence a fresh RND / UniG draw) at ``--eot`` queries per step,
  against the randomised defences; ``square_top1`` minimises the top-1 log-odds instead of the margin (the loss AAA does not reshape).

Against ``detect`` (a stateful defence keyed by API key) the attacker gives every image its own API key (a single key
for all images would be refused at its second step), sends one request per key and step, and takes a refusal (429 /
403) as the end of that image's attack: the image keeps its last accepted state. ``square_sybil`` is the adaptive
attacker against per-account state: each image moves to a fresh API key every ``max_similar`` queries, so no key ever
shows more than ``max_similar - 1`` matching queries. The clean predictions and the final check come from evaluator
keys of their own; the false-positive rate is the fraction of the ``--ece-images`` clean test images refused when one
benign client sends them all, one image per request.

Per cell: clean accuracy (on ``--ece-images`` test images, the same set for every cell), robust accuracy on the first
``--images`` test images (an image counts as robust when the service still labels the attack's final image
correctly; images the service got wrong count as not robust), median queries to the first wrong answer over the
images broken, and the expected calibration error of the returned probabilities (15 bins; n/a for ``label``). Results
go to ``--out`` (JSON + Markdown), rewritten after every cell, so a partial run leaves the finished cells.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_query_attack")

DEFENCES = {
    "none": ["trn"],
    "aaa": ["trn", {"name": "aaa"}],
    "aaa_c": ["trn", {"name": "aaa", "confidence_interval": 0.5}],
    "rnd": ["trn", {"name": "rnd", "std": 0.02}],
    "unig": ["trn", {"name": "unig", "reference_dataset": "fashion-mnist", "num_reference": 4}],
    "detect": ["trn"],
    "detect_fb": [{"name": "trn", "fallback": "checkpoints/trn_fmnist_fallback", "fallback_above": 0.06}],
}
# app.query_detector of the defences that screen queries ({}: QueryDetectorArgs defaults)
DETECTORS = {"detect": {}, "detect_fb": {}}
POLICIES = {"full": {"output": "full"}, "top_k": {"output": "top_k", "k": 3},
            "rounded": {"output": "rounded", "decimals": 2}, "label": {"output": "label"}}
RANDOMISED = ("rnd", "unig")


# ---------------------------------------------------------------------------------------------------- HTTP model
class HttpModel:
    """A score "model" that is the live service: (B, C, H, W) in [0, 1] -> (B, num_classes) scores via HTTP.

    Scores are ``log(p + 1e-12)`` of the returned probabilities (missing classes: p = 0; label-only: one-hot).
    ``eot`` > 1 averages the probabilities of ``eot`` jittered copies of each image (a new image each: fresh noise).
    ``loss = "top1"`` returns scores whose margin is the top-1 log-odds (p1 / (1 - p1)), for an attacker who ignores
    the runner-up. Counts HTTP requests and image queries. ``api_key``: the ``x-api-key`` of every request.

    Per-image keys (``key_of``, against a stateful defence): each queried image is traced back to the attacked image
    it perturbs (``origins``, the nearest in Linf, within ``eps``), its requests carry ``key_of(image index, queries
    answered for it so far)``, one request per key and call, sent concurrently. A 429 / 403 stops that image: it is
    never sent again and gets a one-hot of its label ``labels`` (a candidate the attack does not keep).
    """

    def __init__(self, client, url: str, params: dict, names: list[str], eot: int = 1, loss: str = "margin",
                 chunk: int = 512, seed: int = 0, api_key: str | None = None, origins: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, key_of=None, eps: float = 0.0) -> None:
        self.client, self.url, self.params = client, url, params
        self.names, self.num_classes = list(names), len(names)
        self.eot, self.loss, self.chunk = eot, loss, chunk
        self.requests = self.queries = self.refused = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.api_key, self.origins, self.labels, self.key_of, self.eps = api_key, origins, labels, key_of, eps
        n = 0 if origins is None else len(origins)
        self.answered, self.stopped = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        self.keys: set[str] = set()

    def _post(self, x: torch.Tensor, key: str | None):
        buf = io.BytesIO()
        np.savez(buf, images=x.detach().cpu().float().numpy())
        headers = {"Content-Type": "application/x-npz", **({"x-api-key": key} if key else {})}
        return self.client.post(self.url, params=self.params, content=buf.getvalue(), headers=headers)

    def _parse(self, r) -> list[torch.Tensor]:
        out = []
        for res in r.json()["results"]:
            p = torch.zeros(self.num_classes, dtype=torch.float64)
            if res["probabilities"] is None:
                p[res["index"]] = 1.0
            else:
                for idx_name, v in res["probabilities"].items():
                    p[self.names.index(idx_name)] = float(v)
            p[res["index"]] += 1e-9  # the returned label wins ties among rounded probabilities
            out.append(p)
        return out

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) returned probabilities (one HTTP request per ``chunk`` images, or per key and call with
        ``key_of``)."""
        if self.key_of is not None:
            return self._keyed_probabilities(x)
        out = []
        for i in range(0, len(x), self.chunk):
            r = self._post(x[i : i + self.chunk], self.api_key)
            self.requests += 1
            self.queries += len(x[i : i + self.chunk])
            if r.status_code != 200:
                raise RuntimeError(f"service answered {r.status_code}: {r.text[:300]}")
            out += self._parse(r)
        return torch.stack(out)

    def _keyed_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        # the attacked image each query belongs to: nearest origin in L2 (one matrix product; a broadcast Linf over
        # every (query, origin) pair cost gigabytes per call at 1,000 images), then checked in Linf
        q = x.detach().cpu().flatten(1).double()  # (B, D)
        o = self.origins.flatten(1).double()  # (N, D)
        owner = ((o * o).sum(1)[None] - 2 * q @ o.T).argmin(1)  # (B,): ||q - o||^2 up to the constant ||q||^2
        dist = (q - o[owner]).abs().amax(1)
        if (dist > self.eps + 1e-5).any():
            raise RuntimeError(f"a query lies {float(dist.max()):.3f} (Linf) from every attacked image")
        out = torch.zeros(len(x), self.num_classes, dtype=torch.float64)
        out[torch.arange(len(x)), self.labels[owner]] = 1.0  # stopped images: "as correct as can be"
        groups: dict[str, list[int]] = {}
        for i, o in enumerate(owner.tolist()):
            if not self.stopped[o]:
                groups.setdefault(self.key_of(o, int(self.answered[o])), []).append(i)
        self.keys.update(groups)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda kv: (kv[1], self._post(x[kv[1]], kv[0])), groups.items()))
        for idx, r in answers:
            self.requests += 1
            if r.status_code in (403, 429):  # this client may query no more: the attack on its image(s) ends
                self.refused += 1
                self.stopped[owner[idx]] = True
                continue
            if r.status_code != 200:
                raise RuntimeError(f"service answered {r.status_code}: {r.text[:300]}")
            out[idx] = torch.stack(self._parse(r))
            self.queries += len(idx)
            self.answered[owner[idx]] += 1
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.eot > 1:
            xs = torch.cat([(x + 2.5 / 255 * (2 * torch.rand(x.shape, generator=self.gen) - 1)).clamp(0, 1)
                            for _ in range(self.eot)])
            p = self.probabilities(xs).view(self.eot, len(x), -1).mean(0)
        else:
            p = self.probabilities(x)
        if self.loss == "top1":
            # margin seen by Square = the top-1 log-odds shifted to be >= 0 (log(p1 / (1 - p1)) + log(C - 1)) while
            # the label is right, and its negative once it is wrong: the runner-up (what AAA reshapes) is ignored
            p1, top = p.max(1)
            odds = torch.log(p1.clamp_min(1e-12)) - torch.log((1 - p1).clamp_min(1e-12)) + math.log(p.shape[1] - 1)
            odds = odds.clamp_min(1e-6)
            z = (-odds / 2)[:, None].expand_as(p).clone()
            return z.scatter(1, top[:, None], (odds / 2)[:, None]).float()
        return torch.log(p + 1e-12).float()


# ---------------------------------------------------------------------------------------------------- RayS
@torch.no_grad()
def rays(model: HttpModel, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, search_steps: int = 10
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """RayS (Chen & Gu 2020), Linf, hard-label: search sign directions block by block (halving the blocks), keep a
    direction when its decision boundary is nearer, binary-search the radius. Stops at radius <= eps or ``queries``.

    Returns:
        (x_adv (the best point found, projected to the eps ball), queries used per image)
    """
    b, dims = len(x), x[0].numel()
    shape = x.shape

    def wrong(xq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        used[idx] += 1
        return model(xq).argmax(1) != y[idx]

    used = torch.zeros(b, dtype=torch.long)
    d = torch.ones(b, dims)
    r_best = torch.full((b,), math.inf)
    # initial direction: all +1, checked at radius 1
    ok = wrong((x + d.view(shape)).clamp(0, 1), torch.arange(b))
    r_best[ok] = 1.0
    level, block = 0, 0
    while True:
        active = ((r_best > eps) & (used < queries)).nonzero().squeeze(1)
        if len(active) == 0:
            break
        n_blocks = 2 ** level
        size = max(1, math.ceil(dims / n_blocks))
        lo, hi = block * size, min(dims, (block + 1) * size)
        block += 1
        if block * size >= dims:
            level, block = (level + 1) if size > 1 else level, 0
        cand = d[active].clone()
        cand[:, lo:hi] *= -1
        radius = torch.where(torch.isinf(r_best[active]), torch.ones(len(active)), r_best[active])
        hit = wrong((x[active] + radius[:, None, None, None] * cand.view(-1, *shape[1:])).clamp(0, 1), active)
        if not hit.any():
            continue
        sel, lo_r, hi_r = active[hit], torch.zeros(int(hit.sum())), radius[hit]
        cand = cand[hit]
        for _ in range(search_steps):  # boundary between lo_r (correct) and hi_r (wrong)
            live = used[sel] < queries
            if not live.any():
                break
            mid = (lo_r + hi_r) / 2
            w = wrong((x[sel[live]] + mid[live][:, None, None, None] * cand[live].view(-1, *shape[1:])).clamp(0, 1),
                      sel[live])
            m_live = mid[live]
            hi_r[live] = torch.where(w, m_live, hi_r[live])
            lo_r[live] = torch.where(w, lo_r[live], m_live)
        better = hi_r < r_best[sel]
        r_best[sel[better]] = hi_r[better]
        d[sel[better]] = cand[better]
    r = torch.where(torch.isinf(r_best), torch.zeros(b), r_best.clamp(max=eps))
    x_adv = (x + r[:, None, None, None] * d.view(shape)).clamp(0, 1)
    return x_adv, used


# ---------------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    defence: str
    policy: str
    attack: str


def _ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    from trn.output_policy import expected_calibration_error

    return expected_calibration_error(probs.numpy(), labels.numpy())


def false_positive_rate(client, url: str, params: dict, x: torch.Tensor, key: str) -> tuple[float, int]:
    """(fraction of the images refused (429 / 403), requests) when one benign client sends ``x``, one per request."""
    refused = 0
    for i in range(len(x)):
        buf = io.BytesIO()
        np.savez(buf, images=x[i : i + 1].numpy())
        r = client.post(url, params=params, content=buf.getvalue(),
                        headers={"Content-Type": "application/x-npz", "x-api-key": key})
        if r.status_code in (403, 429):
            refused += 1
        elif r.status_code != 200:
            raise RuntimeError(f"service answered {r.status_code}: {r.text[:300]}")
    return refused / max(1, len(x)), len(x)


def run_cell(cell: Cell, client, base: str, data: dict, args: argparse.Namespace, names: list[str]) -> dict:
    from trn.attacks import Square
    from trn.serve_config import QueryDetectorArgs

    url = f"{base}/{cell.defence}/v1/classify/batch"
    params = POLICIES[cell.policy]
    t0 = time.perf_counter()
    tag = f"{cell.defence}-{cell.policy}-{cell.attack}"  # keys of this cell: the detector remembers other cells'

    def evaluator(name: str) -> HttpModel:  # a trusted client, a key per pass (never the attacker's)
        return HttpModel(client, url, params, names, api_key=f"{tag}-eval-{name}")

    fp_rate = fp_requests = None
    if cell.defence in DETECTORS:
        fp_rate, fp_requests = false_positive_rate(client, url, params, data["ece_x"], f"{tag}-benign")
    ece_model = evaluator("ece")
    pe = ece_model.probabilities(data["ece_x"])
    clean_acc = float((pe.argmax(1) == data["ece_y"]).float().mean())
    ece = None if cell.policy == "label" else _ece(pe, data["ece_y"])
    x, y = data["x"], data["y"]
    clean_model = evaluator("clean")
    pred = clean_model.probabilities(x).argmax(1)
    correct = (pred == y).nonzero().squeeze(1)
    eot = args.eot if cell.attack == "square_eot" else 1
    xs, ys = x[correct], y[correct]
    keyed: dict = {}
    if cell.defence in DETECTORS:  # a key per attacked image (square_sybil: a new one every max_similar queries)
        k = QueryDetectorArgs(**DETECTORS[cell.defence]).max_similar
        rotate = cell.attack == "square_sybil"
        keyed = {"origins": xs, "labels": ys, "eps": args.eps,
                 "key_of": lambda i, n: f"{tag}-attacker-{i}" + (f"-{n // max(1, k)}" if rotate else "")}
    model = HttpModel(client, url, params, names, eot=eot, loss="top1" if cell.attack == "square_top1" else "margin",
                      seed=args.seed, **keyed)
    if cell.attack.startswith("square"):
        atk = Square(eps=args.eps, queries=max(1, args.queries // eot), p_init=args.p_init, seed=args.seed)
        x_adv = atk(model, xs, ys)
        used = model.answered * eot if keyed else atk.last_queries * eot
    else:
        x_adv, used = rays(model, xs, ys, args.eps, args.queries)
        used = model.answered if keyed else used
    assert (x_adv - xs).abs().max() <= args.eps + 1e-6
    final_model = evaluator("final")
    final = final_model.probabilities(x_adv).argmax(1) if len(xs) else torch.zeros(0, dtype=torch.long)
    still = final == ys
    broken = (~still).nonzero().squeeze(1)
    row = {
        "defence": cell.defence, "policy": cell.policy, "attack": cell.attack, "images": len(x),
        "clean_acc_ece_set": round(100 * clean_acc, 2), "ece_images": len(data["ece_y"]),
        "clean_acc_attack_set": round(100 * len(correct) / len(x), 2),
        "robust_acc": round(100 * int(still.sum()) / len(x), 2),
        "median_queries_broken": statistics.median(used[broken].tolist()) if len(broken) else None,
        "ece": None if ece is None else round(ece, 4),
        "http_requests": model.requests + ece_model.requests + clean_model.requests + final_model.requests,
        "image_queries": model.queries, "queries_budget": args.queries, "eot": eot,
        "attacker_keys": len(model.keys) if keyed else None, "refused_requests": model.refused if keyed else None,
        "images_stopped": int(model.stopped.sum()) if keyed else None,
        "benign_refused_pct": None if fp_rate is None else round(100 * fp_rate, 2), "benign_images": fp_requests,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("%s", row)
    return row


def _write(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Query attacks over HTTP ({meta['started']})", "",
             (f"{meta['images']} Fashion-MNIST test images, Linf eps {meta['eps']}, {meta['queries']} queries per "
              f"image, clean accuracy and ECE on {meta['ece_images']} test images; service: {meta['service']}."), "",
             "| defence | output | attack | clean acc % | robust acc % | median queries (broken) | ECE | requests | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ece = "n/a" if r["ece"] is None else f"{r['ece']:.4f}"
        mq = "-" if r["median_queries_broken"] is None else f"{r['median_queries_broken']:g}"
        lines.append(f"| {r['defence']} | {r['policy']} | {r['attack']}{' x' + str(r['eot']) if r['eot'] > 1 else ''}"
                     f" | {r['clean_acc_ece_set']:.2f} | {r['robust_acc']:.1f} | {mq} | {ece} | "
                     f"{r['http_requests']} | {r['seconds']:.0f} |")
    detected = [r for r in rows if r.get("attacker_keys") is not None]
    if detected:
        lines += ["", "Stateful detector (a key per attacked image; square_sybil: a new key every max_similar queries):",
                  "", "| defence | attack | attacker keys | images stopped | refused requests | benign refused % (of N) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['defence']} | {r['attack']} | {r['attacker_keys']} | {r['images_stopped']} | "
                  f"{r['refused_requests']} | {r['benign_refused_pct']:.2f} (of {r['benign_images']}) |"
                  for r in detected]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _cells(args: argparse.Namespace) -> list[Cell]:
    """The issue's cells, most informative first (a partial run keeps the first ones)."""
    if args.cells:
        out = []
        for c in args.cells.split(","):
            d, p, a = c.split(":")
            out.append(Cell(d, p, a))
        return out
    defences, policies = args.defences.split(","), args.policies.split(",")
    cells = [Cell(d, "full", "square") for d in defences]
    cells += [Cell(d, "label", "rays") for d in defences[:1]]
    cells += [Cell(d, "full", "square_top1") for d in defences if d.startswith("aaa")]
    cells += [Cell(d, "full", "square_eot") for d in defences if d in RANDOMISED]
    cells += [Cell("none", p, "square") for p in policies if p not in ("full", "label")]
    cells += [Cell(d, p, "square") for d in defences[1:] for p in policies if p not in ("full", "label")]
    cells += [Cell(d, "label", "rays") for d in defences[1:]]
    return cells


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "trn_fmnist"), help="restorer (TRN -> guard)")
    p.add_argument("--fallback", default=str(REPO / "checkpoints" / "trn_fmnist_fallback"),
                   help="the detect_fb cells' fallback restorer")
    p.add_argument("--tiny", action="store_true", help="an untrained tiny restorer and random images (smoke test)")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--ece-images", type=int, default=2000)
    p.add_argument("--queries", type=int, default=2500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--p-init", type=float, default=0.3, help="Square's initial square size (configs/eval_defenses)")
    p.add_argument("--eot", type=int, default=8, help="samples per candidate in the adaptive EOT variant")
    p.add_argument("--defences", default="none,aaa,rnd,unig,aaa_c")
    p.add_argument("--policies", default="full,top_k,rounded,label")
    p.add_argument("--cells", default=None, help="explicit DEFENCE:POLICY:ATTACK,... (overrides the default order "
                   "and --defences: only these cells' defences are deployed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--out", default=str(REPO / "runs" / "query_attack"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    import httpx
    import ray
    from ray import serve
    from ray.serve.api import RunTarget

    from trn.data import load_dataset
    from trn_workers.serve import build_app

    tmp = tempfile.TemporaryDirectory()
    restorer = args.checkpoint
    # one app per defence the cells use (--cells), else per --defences: every app takes a CPU share and a replica
    wanted = {c.split(":")[0] for c in args.cells.split(",") if c} if args.cells else set(args.defences.split(","))
    defences = {k: v for k, v in DEFENCES.items() if k in wanted}
    if "detect_fb" in defences:
        defences["detect_fb"] = [{**defences["detect_fb"][0], "fallback": args.fallback}]
    if args.tiny:
        from trn.restorer import Restorer

        r = Restorer.build((1, 28, 28), num_classes=10, seed=0)
        r.save(Path(tmp.name) / "tiny")
        restorer = str(Path(tmp.name) / "tiny")
        g = torch.Generator().manual_seed(args.seed)
        data = {"x": torch.rand(args.images, 1, 28, 28, generator=g),
                "ece_x": torch.rand(args.ece_images, 1, 28, 28, generator=g)}
        with torch.no_grad():  # labels = the tiny model's own predictions, so the attack has something to break
            data["y"] = r.guard(r.restore(data["x"])).argmax(1)
            data["ece_y"] = r.guard(r.restore(data["ece_x"])).argmax(1)
        if "unig" in defences:
            defences["unig"] = ["trn", {"name": "unig", "reference_dataset": "fashion-mnist", "num_reference": 4}]
    else:
        test = load_dataset("fashion-mnist", None, "test")
        data = {"x": test.images[: args.images], "y": test.labels[: args.images],
                "ece_x": test.images[-args.ece_images:], "ece_y": test.labels[-args.ece_images:]}

    for attempt in range(3):  # on a saturated machine the raylet can miss Ray's fixed start-up deadline
        try:
            # one app per defence at 0.5 logical CPU each, plus Serve's proxy: fewer CPUs would leave an app
            # unscheduled and the run waiting forever (a 2-CPU Ray cannot place five apps)
            cpus = max(args.cpus, math.ceil(0.5 * len(defences)) + 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            break
        except Exception as e:
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
    port = _free_port()
    rows: list[dict] = []
    meta = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "images": args.images, "eps": args.eps,
            "queries": args.queries, "ece_images": args.ece_images, "p_init": args.p_init, "eot": args.eot,
            "service": f"trn serve, restorer {Path(restorer).name} -> guard, one replica, 1 CPU each",
            "defences": defences, "policies": POLICIES, "argv": sys.argv[1:]}
    out = Path(args.out)
    try:
        for attempt in range(3):  # the proxy actor can die at start-up on a saturated machine: try again
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                break
            except Exception:
                log.warning("serve.start failed (attempt %d)", attempt + 1, exc_info=attempt == 2)
                serve.shutdown()
                if attempt == 2:
                    raise
                time.sleep(10)
        targets = []
        for name, spec in defences.items():
            app = build_app({"restorer": restorer, "defenses": spec, "output": {"policy": "full"},
                             **({"query_detector": DETECTORS[name]} if name in DETECTORS else {}),
                             "max_batch_size": 256, "batch_wait_timeout_s": 0.002, "max_ongoing_requests": 1024,
                             "max_batch_images": 4096, "max_body_bytes": 64 << 20, "num_cpus": 0.5,
                             "health_check_period_s": 30.0})
            targets.append(RunTarget(app, name, f"/{name}"))
        serve.run_many(targets, wait_for_applications_running=True)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=600) as client:
            names = None
            for cell in _cells(args):
                if cell.defence not in defences:
                    continue
                if names is None:
                    r = client.post(f"{base}/{cell.defence}/v1/classify/batch", params={"output": "full"},
                                    content=_npz(data["x"][:1]), headers={"Content-Type": "application/x-npz"})
                    names = list(r.json()["results"][0]["probabilities"])
                try:
                    rows.append(run_cell(cell, client, base, data, args, names))
                except Exception as e:
                    log.exception("cell %s failed", cell)
                    rows.append({"defence": cell.defence, "policy": cell.policy, "attack": cell.attack,
                                 "error": f"{type(e).__name__}: {e}"})
                _write([r for r in rows if "error" not in r], out, meta)
                (out / "errors.json").write_text(json.dumps([r for r in rows if "error" in r], indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    print((out / "results.md").read_text() if (out / "results.md").exists() else "no cell finished")
    return 0 if rows and all("error" not in r for r in rows) else 1


def _npz(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=x.numpy())
    return buf.getvalue()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
