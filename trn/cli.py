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

    cfg = load_config(ClassifierTrainConfig, args.config, args.set)
    meta = train_classifier(cfg)
    print(f"test accuracy {meta['test_accuracy']:.4f} on {meta['test_images']} images -> {cfg.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.train_trn import TRNTrainConfig, train_trn

    cfg = load_config(TRNTrainConfig, args.config, args.set)
    train_trn(cfg)
    print(f"saved {cfg.out}.safetensors / .json")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from trn.config import load_config
    from trn.evaluate import EvalConfig, run_evaluation

    cfg = load_config(EvalConfig, args.config, args.set)
    report = run_evaluation(cfg)
    print(report.markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trn", description="Two-stream Restoration Network: adversarial image cleaning.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train-classifier", help="train a guard/downstream classifier")
    s.add_argument("--config", required=True, help="YAML file (see configs/classifier_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_train_classifier)

    s = sub.add_parser("train", help="train a TRN restorer against a frozen guard (resumable)")
    s.add_argument("--config", required=True, help="YAML file (see configs/trn_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("eval", help="gray-box and adaptive robustness report (Markdown + JSON + PNGs)")
    s.add_argument("--config", required=True, help="YAML file (see configs/eval_fmnist.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    s.set_defaults(fn=_cmd_eval)
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
