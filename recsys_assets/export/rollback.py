"""Roll the served bundle back: `python -m recsys_assets.export.rollback [--to VERSION]` (`make rollback`).

Switches `$RECSYS_HOME/bundles/current` to the previous champion in promotions.jsonl, or to
`--to VERSION`, after verifying that bundle's checksums (and its signature, where
RECSYS_BUNDLE_PUBLIC_KEY_FILE or $RECSYS_HOME/secrets/bundle_signing_key.pub gives public keys);
the switch is logged in promotions.jsonl.
A running service notices the switch within RECSYS_RELOAD_INTERVAL_S and follows it without a
restart (recsys_serving/README.md). Exit status 0 when switched, 1 when refused (nothing changed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsys_assets.export.bundle import current_version, rollback
from recsys_serving.bundle import BundleRefused
from recsys_serving.contract import BUNDLES_DIR, recsys_home_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys_assets.export.rollback",
        description="Switch bundles/current back to the previous champion (or to --to VERSION).",
    )
    parser.add_argument("--to", metavar="VERSION", default=None, help="a bundle version under bundles/")
    parser.add_argument("--reason", default=None, help="why, recorded in promotions.jsonl")
    parser.add_argument("--root", type=Path, default=None, help="bundles directory (default $RECSYS_HOME/bundles)")
    args = parser.parse_args(argv)
    root = args.root or recsys_home_path() / BUNDLES_DIR
    before = current_version(root) or "nothing"
    try:
        record = rollback(root, to=args.to, reason=args.reason)
    except BundleRefused as exc:
        print(f"rollback refused: bundle {Path(exc.path).name} does not verify ({exc.reason}); "
              f"{root / 'current'} still points to {before}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"rollback refused: {exc}; {root / 'current'} still points to {before}", file=sys.stderr)
        return 1
    print(f"rolled back {root / 'current'}: {record.previous} -> {record.version} at {record.at} "
          f"({'; '.join(record.reasons)}); running services follow within RECSYS_RELOAD_INTERVAL_S")
    return 0


if __name__ == "__main__":
    sys.exit(main())
