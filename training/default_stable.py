"""Choose the version a fresh deployment starts with as stable, from evidence, and write the
decision and its evidence next to the versions, in `models/default_deployment.json`.

    python -m training.default_stable            # evaluate every installed version, decide, write
    python -m training.default_stable --dry-run  # print the table and the decision only

Every installed version is evaluated now, with the same code (`training.evaluate`) on the
same sets, so the versions are compared on equal terms rather than through cards written at
different times. The rule (`choose`):

1. the highest int8 accuracy on the fixed 1,000-image test split;
2. on a tie, the higher mean accuracy on user-style uploads and printed digits;
3. then the newer version.

Other writers (the UCI digits) are measured and written into the evidence, but never decide:
they stay an evaluation-only figure. The service reads the file at start
(`ModelRegistry.default_version`): it names the stable version of the first deployment of a
fresh database (`DEFAULT_MODEL_VERSION` overrides it). A deployment already running keeps its
own stable; a newer version reaches it as a proposed candidate through the release phase.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_api.inference.registry import DEFAULT_DEPLOYMENT_FILE, ModelRegistry
from training.evaluate import build_suites, load_version, suite_metrics

RULE = (
    "highest int8 accuracy on the fixed test split; on a tie, the higher mean accuracy on "
    "user-style uploads and printed digits; then the newer version. Other writers (UCI) are "
    "reported and never decide."
)
DECIDING_SETS = ("user_style", "printed")


def choose(evidence: Sequence[dict[str, Any]]) -> str:
    """The version the rule picks from per-version evidence, listed oldest first.

    (The sum of the deciding sets' accuracies orders versions as their mean does.)
    """
    ranked = [
        (
            entry["metrics"]["test_accuracy"],
            sum(entry["metrics"][f"{name}_accuracy"] for name in DECIDING_SETS),
            position,  # newer is later in the list
            entry["version"],
        )
        for position, entry in enumerate(evidence)
    ]
    return max(ranked)[3]


def gather(models_dir: Path, subset: int | None = None) -> list[dict[str, Any]]:
    """Evaluate every installed version (oldest first) on every set: accuracy, ECE, size."""
    registry = ModelRegistry.discover(models_dir)
    suites = build_suites(subset)
    evidence = []
    for version in registry.versions():
        model = load_version(models_dir / version)
        evidence.append(
            {
                "version": version,
                "created": model.card.get("created", ""),
                "recipe": model.card.get("training", {}).get("recipe", "v1"),
                "metrics": suite_metrics(model, suites),
            }
        )
    return evidence


def decision(evidence: list[dict[str, Any]]) -> dict[str, Any]:
    """The file's content: the chosen stable version, the rule and the evidence."""
    return {
        "stable": choose(evidence),
        "rule": RULE,
        "decided": datetime.date.today().isoformat(),
        "command": "python -m training.default_stable",
        "evidence": evidence,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate, decide, print, and (unless --dry-run) write the decision file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")
    args = parser.parse_args(argv)
    evidence = gather(args.models_dir)
    chosen = decision(evidence)
    for entry in evidence:
        figures = ", ".join(
            f"{key} {value}" for key, value in entry["metrics"].items() if key.endswith("accuracy")
        )
        print(f"{entry['version']}: {figures}")
    print(f"default stable: {chosen['stable']} ({RULE})")
    if not args.dry_run:
        path = args.models_dir / DEFAULT_DEPLOYMENT_FILE
        path.write_text(json.dumps(chosen, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
