"""Check the page's vendored runtime files byte for byte against their npm packages.

    python -m tools.check_vendor            # needs npm and the npm registry (CI does this)
    python -m tools.check_vendor --offline  # only the SHA-256s recorded in vendor.json

For each package in `static/vendor/vendor.json`, `npm pack <name>@<version>` fetches the
registry's tarball; its SHA-512 must be the recorded `integrity`, and every vendored file
must equal the tarball's `package/<file>` byte for byte (and hash to the recorded SHA-256).
Exit status 1 on any difference, with one line per problem.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "static" / "vendor"
MANIFEST = VENDOR / "vendor.json"


def manifest() -> list[dict[str, Any]]:
    """The vendored packages, as recorded."""
    packages: list[dict[str, Any]] = json.loads(MANIFEST.read_text())["packages"]
    return packages


def recorded_problems(package: dict[str, Any]) -> list[str]:
    """Files missing or not hashing to the SHA-256 recorded in vendor.json."""
    problems = []
    for name, sha256 in package["files"].items():
        path = VENDOR / package["folder"] / name
        if not path.is_file():
            problems.append(f"{path.relative_to(ROOT)}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            problems.append(f"{path.relative_to(ROOT)}: SHA-256 differs from vendor.json")
    if not (VENDOR / package["license_file"]).is_file():
        problems.append(f"licence file {package['license_file']} missing")
    return problems


def npm_tarball(package: dict[str, Any], folder: Path) -> Path:
    """`npm pack` the exact version from the registry into `folder`; the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm not found: install nodejs and npm (apt-get install npm)")
    spec = f"{package['package']}@{package['version']}"
    result = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(folder), "--json", "--silent"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    [packed] = json.loads(result.stdout)
    return folder / packed["filename"]


def tarball_problems(package: dict[str, Any], tarball: Path) -> list[str]:
    """Differences between the vendored files and the registry's tarball."""
    content = tarball.read_bytes()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(content).digest()).decode()
    problems = []
    if integrity != package["integrity"]:
        problems.append(f"{package['package']}: the registry's tarball is not the recorded one")
    with tarfile.open(tarball) as archive:
        for name in package["files"]:
            member = archive.extractfile(f"package/{name}")
            if member is None:
                problems.append(f"{package['package']}: {name} is not in the package")
                continue
            vendored = VENDOR / package["folder"] / name
            if not vendored.is_file() or vendored.read_bytes() != member.read():
                problems.append(f"{vendored.relative_to(ROOT)}: differs from the npm package")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print the problems; 0 when there are none."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="skip the npm registry")
    args = parser.parse_args(argv)
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        for package in manifest():
            problems += recorded_problems(package)
            if not args.offline:
                problems += tarball_problems(package, npm_tarball(package, Path(scratch)))
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        checked = "recorded hashes" if args.offline else "npm registry tarballs"
        print(f"vendored files match their {checked}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
