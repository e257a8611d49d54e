"""Retrain the digit model on the base MNIST split plus the users' feedback, gate it against
stable, and install it as a new version proposed as candidate only if it passes.

    python -m training.retrain                       # DATABASE_URL (or the embedded SQLite)
    python -m training.retrain --database-url postgres://...   # e.g. production
    python -m training.retrain --feedback feedback.npz         # an exported file
    python -m training.retrain --epochs 1 --subset 300         # a quick run
    python -m training.retrain export --out feedback.npz       # export the feedback

Gates (all must pass; the report says which did not):
- quantisation: the int8 challenger loses at most 0.5 points to its float self on (a);
- (a) the fixed 1,000-sample test split: not worse than stable by more than `--tolerance`
  (0.5 points); after a plain retrain (too little feedback for gate b) it must beat stable;
- (b) the newest feedback, held out from training: strictly better than stable.

Exit status: 0 when the challenger was installed (and proposed), 1 when it was refused
(nothing installed, nothing proposed), 2 on a usage error or when the deployment in force
cannot be read (the gate's stable is the stable of that deployment, read from the same
database as the feedback: never "the newest installed version"). A report (markdown + PNG) is
written either way into `--report-dir`, and next to the new version when installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from mnist_api.config import Settings
from mnist_api.deployment.proposals import (
    Proposal,
    StableUnknown,
    propose_candidate,
    stable_version,
)
from mnist_api.feedback.store import FeedbackRows
from mnist_api.inference.model import DigitModel
from mnist_api.inference.registry import CARD_FILE, TFLITE_FILE, ModelRegistry
from training import challenger as challenger_model
from training import report as reporting
from training.browser_variant import write_browser_variant
from training.card import file_fields
from training.data import (
    DATA_SOURCE,
    SPLIT_EXPRESSION,
    load_split,
    normalize_batch,
    stratified_subset,
)
from training.evaluate import other_suites, suite_metrics
from training.feedback_data import (
    FeedbackRules,
    export_npz,
    read_database,
    read_npz,
    split_feedback,
)

MAX_INT8_DROP = 0.005


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options of a retraining run."""
    parser = argparse.ArgumentParser(
        prog="python -m training.retrain", description=__doc__.splitlines()[0]
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--database-url", help="read feedback here (default: DATABASE_URL)")
    source.add_argument("--feedback", type=Path, help="read feedback from an exported .npz")
    parser.add_argument("--models-dir", type=Path, help="default: MODELS_DIR (models/)")
    parser.add_argument("--stable", help="the version to beat (default: the deployment's)")
    parser.add_argument(
        "--eval-subset",
        type=int,
        default=None,
        help="the card's user-style, printed and other-writers figures on N samples each",
    )
    parser.add_argument("--report-dir", type=Path, default=Path("build/retrain"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subset", type=int, help="train on N base samples only (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance", type=float, default=0.005, help="gate (a): allowed loss (0.005 = 0.5 pt)"
    )
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--min-feedback", type=int, default=20)
    parser.add_argument("--per-key-cap", type=float, default=50.0)
    parser.add_argument("--feedback-weight", type=float, default=10.0)
    parser.add_argument("--max-feedback-share", type=float, default=0.5)
    parser.add_argument("--from-scratch", action="store_true", help="do not start from stable")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--calibration-samples", type=int, default=400)
    parser.add_argument("--strategy", choices=["canary", "bandit"], default="canary")
    parser.add_argument("--candidate-share", type=float, default=0.1)
    parser.add_argument(
        "--no-propose",
        dest="propose",
        action="store_false",
        help="install and record the proposal in the card, but leave the deployment alone "
        "(the release phase proposes it after a merge)",
    )
    return parser.parse_args(argv)


def export(argv: list[str]) -> int:
    """`export --out FILE [--database-url URL]`: the feedback as a plain .npz."""
    parser = argparse.ArgumentParser(prog="python -m training.retrain export")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--database-url", help="default: DATABASE_URL")
    args = parser.parse_args(argv)
    rows = read_database(args.database_url or Settings.from_env().database_url)
    export_npz(rows, args.out)
    print(f"exported {len(rows)} feedback rows to {args.out}")
    return 0


def load_feedback(args: argparse.Namespace, settings: Settings) -> FeedbackRows:
    """The feedback rows from the exported file or the database."""
    if args.feedback is not None:
        return read_npz(args.feedback)
    return read_database(args.database_url or settings.database_url)


def run(args: argparse.Namespace) -> int:
    """Train, gate, report; install and propose only a challenger that passes."""
    started = time.monotonic()
    settings = Settings.from_env()
    if args.database_url:  # the feedback, the deployment in force and the proposal: one place
        settings = settings.replace(database_url=args.database_url)
    models_dir: Path = args.models_dir or settings.models_dir
    settings = settings.replace(models_dir=models_dir)
    registry = ModelRegistry.discover(models_dir)
    try:
        stable = registry.get(args.stable or stable_version(settings, registry))
    except StableUnknown as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stable.load()
    rules = FeedbackRules(
        max_key_share=settings.evidence_max_share_per_key,
        min_keys=settings.evidence_min_keys,
        holdout_fraction=args.holdout_fraction,
        min_examples=args.min_feedback,
        feedback_weight=args.feedback_weight,
        per_key_cap=args.per_key_cap,
        max_feedback_share=args.max_feedback_share,
    )
    plan = challenger_model.TrainingPlan(
        epochs=args.epochs,
        seed=args.seed,
        augment=args.augment,
        calibration_samples=args.calibration_samples,
    )

    split = load_split()
    x_train, y_train = split.x_train, split.y_train
    if args.subset:
        x_train, y_train, _, _ = stratified_subset(x_train, y_train, args.subset, args.seed)
    feedback = split_feedback(load_feedback(args, settings), len(y_train), rules)
    print(feedback.describe(rules), flush=True)

    test_images = normalize_batch(split.x_test)
    test_stable = reporting.Scores.of(
        split.y_test, challenger_model.probabilities(stable, test_images)
    )
    holdout_stable = None
    if not feedback.plain:
        holdout_stable = reporting.Scores.of(
            feedback.holdout_labels,
            challenger_model.probabilities(stable, feedback.holdout_images),
            feedback.holdout_weights,
        )

    model, how = challenger_model.starting_model(models_dir / stable.version, args.from_scratch)
    print(f"challenger {how}, {plan.epochs} epochs on {len(y_train)} base samples", flush=True)
    losses = challenger_model.train(
        model, x_train, y_train, feedback, plan, fine_tune=how.startswith("fine")
    )
    training_text = (
        f"{how}; {plan.epochs} epochs on {len(y_train)} base samples "
        f"({'augmented' if plan.augment else 'clean'}) + {len(feedback.train_labels)} feedback "
        f"examples; final loss {losses[-1]:.4f}"
        if losses
        else f"{how}; no epochs"
    )
    result = reporting.Report(
        stable=stable.version,
        challenger=None,
        feedback=feedback.describe(rules),
        training=training_text,
        test_stable=test_stable,
        test_challenger=None,
        holdout_stable=holdout_stable,
        holdout_challenger=None,
    )
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=models_dir))
    try:
        return _gate_install_propose(
            args, model, x_train, y_train, test_images, split.y_test, feedback, plan, stable,
            staging, result, started, settings,
        )  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gate_install_propose(
    args: argparse.Namespace,
    model: Any,
    x_train: Any,
    y_train: Any,
    test_images: Any,
    y_test: Any,
    feedback: Any,
    plan: challenger_model.TrainingPlan,
    stable: DigitModel,
    staging: Path,
    result: reporting.Report,
    started: float,
    settings: Settings,
) -> int:
    models_dir = staging.parent
    try:
        tflite = challenger_model.quantize(model, x_train, y_train, plan)
    except Exception as error:  # a model that cannot be quantised is refused, not a crash
        result.gates.append(
            reporting.Gate("quantisation", "converts to full int8", False, type(error).__name__)
        )
        return _finish(args, result, None)
    (staging / TFLITE_FILE).write_bytes(tflite)
    candidate = DigitModel(staging / TFLITE_FILE)
    candidate.load()
    result.challenger = candidate.version
    result.test_challenger = reporting.Scores.of(
        y_test, challenger_model.probabilities(candidate, test_images)
    )
    if not feedback.plain:
        result.holdout_challenger = reporting.Scores.of(
            feedback.holdout_labels,
            challenger_model.probabilities(candidate, feedback.holdout_images),
            feedback.holdout_weights,
        )
    float_accuracy = challenger_model.float_accuracy(model, test_images, y_test)
    if feedback.plain or feedback.holdout_evidence:
        result.gates = gates(args, result, float_accuracy, feedback.plain)
    else:  # a holdout from too few keys decides nothing: gated as a plain retrain
        result.gates = gates(
            args, result, float_accuracy, True, f"n/a: holdout from {feedback.holdout_keys} keys"
        )
    if (models_dir / candidate.version).exists():
        result.gates.append(
            reporting.Gate("new", "not installed already", False, "the same model is installed")
        )
    if not result.accepted:
        return _finish(args, result, None)

    proposal = Proposal(candidate.version, args.strategy, args.candidate_share)
    card = model_card(args, candidate, tflite, stable, result, float_accuracy, feedback, plan)
    card["proposed"] = proposal.card_entry()
    # The page's copy of the new version: float32 edges around the same int8 graph.
    card["browser"] = write_browser_variant(staging)
    card["training"]["seconds"] = round(time.monotonic() - started)
    (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    challenger_model.without_optimizer(model).save(staging / challenger_model.KERAS_FILE)
    target = models_dir / candidate.version
    result.decision = f"accepted: {candidate.version} installed as {models_dir.name}/{target.name}"
    reporting.write(result, staging)
    os.rename(staging, target)  # one step: a half-written version folder never exists
    staging.mkdir()  # for the caller's cleanup
    if args.propose:
        outcome = propose_candidate(proposal, settings, by="retrain")
        result.notes.append(f"proposal ({proposal.strategy}): {outcome.message}")
    else:
        result.notes.append(
            f"proposal ({proposal.strategy}, share {proposal.candidate_share}) recorded in the "
            "card; the release phase puts it out after a merge"
        )
    reporting.write(result, target)
    return _finish(args, result, target)


def gates(
    args: argparse.Namespace,
    result: reporting.Report,
    float_accuracy: float,
    plain: bool,
    no_holdout: str = "n/a: too little feedback",
) -> list[reporting.Gate]:
    """The quantisation gate, gate (a) and gate (b), evaluated."""
    assert result.test_challenger is not None
    test_c, test_s = result.test_challenger.accuracy, result.test_stable.accuracy
    found = [
        reporting.Gate(
            "quantisation",
            f"int8 loses at most {MAX_INT8_DROP * 100:.1f} pt to float on (a)",
            test_c >= float_accuracy - MAX_INT8_DROP,
            f"float {float_accuracy:.4f}, int8 {test_c:.4f}",
        )
    ]
    if plain:
        found.append(
            reporting.Gate(
                "(a) test split",
                "plain retrain: better than stable",
                test_c > test_s,
                f"stable {test_s:.4f}, challenger {test_c:.4f}",
            )
        )
        found.append(reporting.Gate("(b) feedback", no_holdout, True, "not evaluated"))
        return found
    found.append(
        reporting.Gate(
            "(a) test split",
            f"not worse than stable by more than {args.tolerance * 100:.1f} pt",
            test_c >= test_s - args.tolerance,
            f"stable {test_s:.4f}, challenger {test_c:.4f}",
        )
    )
    assert result.holdout_stable is not None and result.holdout_challenger is not None
    hold_s, hold_c = result.holdout_stable.accuracy, result.holdout_challenger.accuracy
    found.append(
        reporting.Gate(
            "(b) feedback holdout",
            "better than stable",
            not math.isnan(hold_c) and hold_c > hold_s,
            f"stable {hold_s:.4f}, challenger {hold_c:.4f} ({result.holdout_stable.count})",
        )
    )
    return found


def model_card(
    args: argparse.Namespace,
    candidate: DigitModel,
    tflite: bytes,
    stable: DigitModel,
    result: reporting.Report,
    float_accuracy: float,
    feedback: Any,
    plan: challenger_model.TrainingPlan,
) -> dict[str, Any]:
    """The new version's card: what the service and the release check read, and its story."""
    assert result.test_challenger is not None
    return {
        **file_fields(candidate, tflite),
        "metrics": {
            "accuracy_float": round(float_accuracy, 4),
            "accuracy_int8": round(result.test_challenger.accuracy, 4),
            "test_ece": round(result.test_challenger.ece, 4),
            "test_samples": result.test_challenger.count,
            # The same sets and figures as a `make model` version's card.
            **suite_metrics(candidate, other_suites(args.eval_subset)),
        },
        "data": {
            "source": DATA_SOURCE,
            "split": SPLIT_EXPRESSION,
            "train": args.subset or "all",
            "feedback": result.feedback,
            "calibration": f"{plan.calibration_samples} training images (half augmented)",
        },
        "preprocessing": stable.card.get("preprocessing", ""),
        "training": {
            "method": result.training,
            "parent": stable.version,
            "epochs": plan.epochs,
            "seed": plan.seed,
            "subset": args.subset,
            "runtime": f"tensorflow {package_version('tensorflow-cpu')}",
        },
        "retrain": {
            "stable": stable.version,
            "gates": [
                {"name": g.name, "rule": g.rule, "passed": g.passed, "detail": g.detail}
                for g in result.gates
            ],
            "holdout_accuracy": {
                "stable": _rounded(result.holdout_stable),
                "challenger": _rounded(result.holdout_challenger),
            },
        },
        # Full timestamp: versions are ordered by it, and two may be made on one day.
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _rounded(scores: reporting.Scores | None) -> float | None:
    return None if scores is None or not scores.count else round(scores.accuracy, 4)


def _finish(args: argparse.Namespace, result: reporting.Report, target: Path | None) -> int:
    if target is None:
        failed = ", ".join(g.name for g in result.gates if not g.passed)
        result.decision = f"refused ({failed}): nothing installed, nothing proposed"
    markdown, _ = reporting.write(result, args.report_dir)
    for gate in result.gates:
        print(f"gate {gate.name}: {'pass' if gate.passed else 'FAIL'} ({gate.detail})")
    print(f"{result.decision}\nreport: {markdown}", flush=True)
    return 0 if target is not None else 1


def main(argv: list[str] | None = None) -> int:
    """`export ...`, or a retraining run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export(argv[1:])
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
