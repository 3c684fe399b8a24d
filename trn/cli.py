"""``trn`` command line: a thin layer over the library (and, for ``sanitize``/``serve``, over ``workers``)."""

from __future__ import annotations

import argparse
import logging
import sys

from trn.errors import TRNError

__all__ = ["main"]


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.train_classifier import ClassifierTrainConfig, train_classifier

    overrides = ([f"regularizer={args.regularizer}"] if args.regularizer else []) + args.set  # --set wins
    cfg = load_config(ClassifierTrainConfig, args.config, overrides)
    meta = train_classifier(cfg)
    print(f"test accuracy {meta['test_accuracy']:.4f} on {meta['test_images']} images -> {cfg.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.train_trn import TRNTrainConfig, train_trn

    cfg = load_config(TRNTrainConfig, args.config, args.set)
    if args.workers is not None or args.address is not None:  # Ray Train (DDP); Ray is imported only here
        from trn_workers.train import train_distributed

        train_distributed(cfg, address=args.address, workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker)
    else:
        train_trn(cfg)
    print(f"saved {cfg.out}.safetensors / .json")
    return 0


def _cmd_train_robust(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.train_robust import RobustTrainConfig, train_robust

    cfg = load_config(RobustTrainConfig, args.config, args.set)
    train_robust(cfg)
    print(f"saved {cfg.out}.safetensors / .json")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.evaluate import EvalConfig, run_evaluation

    cfg = load_config(EvalConfig, args.config, args.set)
    report = run_evaluation(cfg)
    print(report.markdown)
    return 0


def _shipped_or_given(path: str) -> str:
    """``path`` if it exists, else the shipped weights it names (``checkpoints/NAME``, see :mod:`trn.weights`);
    unchanged when neither exists, so that the command reports the missing file in its own words."""
    from trn.errors import CheckpointError
    from trn.weights import resolve_checkpoint

    try:
        return str(resolve_checkpoint(path))
    except CheckpointError:
        return path


def _cmd_attack(args: argparse.Namespace) -> int:
    from trn.attack_dataset import run_attack_command

    args.guard = _shipped_or_given(args.guard)
    return run_attack_command(args)


def _cmd_sanitize(args: argparse.Namespace) -> int:
    from trn_workers.sanitize import run_sanitize_command  # Ray is imported only here, never by the library

    args.checkpoint = _shipped_or_given(args.checkpoint)
    return run_sanitize_command(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from trn_workers.serve import run_serve_command

    return run_serve_command(args)


def _cmd_train_agnostic(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.train_agnostic import AgnosticTrainConfig, train_agnostic

    cfg = load_config(AgnosticTrainConfig, args.config, args.set)
    train_agnostic(cfg)
    print(f"saved {cfg.out}.safetensors / .json")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.fit import FitConfig, fit

    opts = {"classifier": args.classifier, "data": args.data, "restorer": args.restorer, "out": args.out,
            "images": args.images, "device": args.device}
    given = [f"{k}={v}" for k, v in opts.items() if v is not None]
    cfg = load_config(FitConfig, None, [*given, *args.set])
    r = fit(cfg)
    h = r.metadata.get("history", [])
    if h:
        print(f"validation ({r.metadata.get('val_images')} images, PGD-10 on your classifier): restored accuracy "
              f"{h[0]['pgd_restored']:.4f} -> {max(h, key=lambda e: e['score'])['pgd_restored']:.4f}")
    print(f"saved {cfg.out}.safetensors / .json")
    if cfg.map_from == "downstream":
        print(f"it reads your classifier's gradient map: use it as {{name: trn, checkpoint: {cfg.out}, "
              f"map_from: {cfg.classifier}}}")
    return 0


def _cmd_eval_downstream(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.eval_downstream import DownstreamEvalConfig, run_downstream_evaluation

    cfg = load_config(DownstreamEvalConfig, args.config, args.set)
    print(run_downstream_evaluation(cfg).markdown)
    return 0


def _cmd_eval_defenses(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.evaluate_defenses import DefenseEvalConfig, run_defense_evaluation

    cfg = load_config(DefenseEvalConfig, args.config, args.set)
    report = run_defense_evaluation(cfg)
    print(report.markdown)
    return 0


def _cmd_eval_adaptive(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.robustness import AdaptiveEvalConfig, run_adaptive_evaluation

    cfg = load_config(AdaptiveEvalConfig, args.config, args.set)
    report = run_adaptive_evaluation(cfg)
    print(report.markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trn", description="Two-stream Restoration Network: adversarial image cleaning.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train-classifier", help="train a guard/downstream classifier")
    s.add_argument("--config", required=True, help="YAML file (see configs/classifier_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.add_argument("--regularizer", choices=["none", "gfa"], default=None,
                   help="training regulariser (same as --set regularizer=...; gfa: DeepDefense alignment)")
    s.set_defaults(fn=_cmd_train_classifier)

    s = sub.add_parser("train", help="train a TRN restorer against a frozen guard (resumable)")
    s.add_argument("--config", required=True, help="YAML file (see configs/trn_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.add_argument("--address", default=None, help="train on this Ray cluster (auto | HOST:PORT) with Ray Train")
    s.add_argument("--workers", type=int, default=None,
                   help="Ray Train DDP workers (default: one process, no Ray); batch_size is split over them")
    s.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker (NCCL when > 0)")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("train-robust", help="adversarially train a restorer through the whole pipeline (resumable)")
    s.add_argument("--config", required=True, help="YAML file (see configs/trn_fmnist_robust.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_train_robust)

    s = sub.add_parser("eval", help="gray-box and adaptive robustness report (Markdown + JSON + PNGs)")
    s.add_argument("--config", required=True, help="YAML file (see configs/eval_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("attack", help="write an adversarial copy of a dataset (npz or image folder) + metadata")
    s.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | cifar10 | svhn | npz | folder")
    s.add_argument("--data-dir", default=None, help="dataset location (file or directory)")
    s.add_argument("--split", default="test", choices=["train", "test"])
    s.add_argument("--limit", type=int, default=None, help="first N images of a seeded shuffle (default: all)")
    s.add_argument("--guard", default="checkpoints/fmnist_guard", help="classifier checkpoint to attack")
    s.add_argument("--attack", default="pgd", help="fgsm | bim | pgd | pgd_l2 | mim | cw | deepfool")
    s.add_argument("--eps", type=float, default=0.1)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--targeted", action="store_true", help="target a random wrong class (seeded)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="OUT.npz, or a directory for an image folder (PNG per class)")
    s.set_defaults(fn=_cmd_attack)

    s = sub.add_parser("sanitize", help="clean a dataset with TRN on Ray Data (folder / parquet / npz)")
    s.add_argument("input", help="image folder, .parquet file/dir with an image-bytes column, or .npz")
    s.add_argument("output", help="output folder (mirrors the input layout) + manifest")
    s.add_argument("--checkpoint", default="checkpoints/trn_fmnist_agnostic",
                   help="restorer checkpoint (no suffix; default: the downstream-agnostic net)")
    s.add_argument("--address", default=None, help="Ray address: auto | ray://host:10001 (default: local Ray)")
    s.add_argument("--workers", type=int, default=2, help="actor pool size")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    s.add_argument("--image-column", default="image", help="parquet column holding encoded image bytes")
    s.add_argument("--resize", default="reject", choices=["reject", "resize"], help="policy for off-size images")
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="logical CPUs (and torch threads) per actor")
    s.add_argument("--retry-errors", action="store_true",
                   help="on resume, process the inputs the manifest lists as errors again (default: they are done)")
    s.add_argument("--defenses", default=None, metavar="SPEC",
                   help="defence stack: a YAML file holding a list, or an inline YAML/JSON list such as "
                        "'[{name: bit_depth, bits: 4}, trn, {name: gcm}]'; input transforms and trn make the images, "
                        "gcm/unig wrap the guard for the manifest's pred_after; a trn entry without checkpoint is "
                        "--checkpoint (default: [trn])")
    s.set_defaults(fn=_cmd_sanitize)

    s = sub.add_parser("serve", help="run the Ray Serve restoration/classification service")
    s.add_argument("--config", default="configs/serve.yaml", help="YAML file (see configs/serve.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.add_argument("--address", default=None, help="Ray address of an existing cluster (default: local Ray)")
    s.add_argument("--blocking", action=argparse.BooleanOptionalAction, default=True, help="run until Ctrl-C")
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser("eval-defenses", help="defence table: TRN vs GCM, UniG, GFA, adversarial training, transforms")
    s.add_argument("--config", required=True, help="YAML file (see configs/eval_defenses_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_eval_defenses)

    s = sub.add_parser("train-agnostic", help="train a downstream-agnostic restorer against a classifier zoo")
    s.add_argument("--config", required=True, help="YAML file (see configs/trn_fmnist_agnostic.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_train_agnostic)

    s = sub.add_parser("fit", help="fit a shipped restorer to your classifier and data (minutes on CPU)")
    s.add_argument("--classifier", required=True, help="trn checkpoint, TorchScript file or torch.export .pt2")
    s.add_argument("--data", default=None, help="image folder, .npz, or a built-in dataset name (default: "
                                                "fashion-mnist)")
    s.add_argument("--restorer", default=None, help="restorer checkpoint to start from (default: "
                                                    "checkpoints/trn_fmnist_agnostic)")
    s.add_argument("--out", default=None, help="output checkpoint, no suffix (default: runs/fit/trn_fitted)")
    s.add_argument("--images", type=int, default=None, help="training images to see (default 16384)")
    s.add_argument("--device", default=None)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a FitConfig option")
    s.set_defaults(fn=_cmd_fit)

    s = sub.add_parser("eval-downstream", help="restorers x downstream classifiers matrix (Markdown + JSON + PNG)")
    s.add_argument("--config", required=True, help="YAML file (see configs/eval_downstream_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_eval_downstream)

    s = sub.add_parser("eval-adaptive", help="strong adaptive evaluation: APGD-CE/DLR, PGD variants, EOT, Square, "
                                             "worst case per image, gradient-masking sanity checks")
    s.add_argument("--config", required=True, help="YAML file (see configs/eval_robust_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_eval_adaptive)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except TRNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
