"""The page's vendored runtime: recorded, licensed, and byte for byte its npm package.

The registry comparison itself (`npm pack`) runs in `make check-vendor` and its own CI step;
here the files are checked against the SHA-256s recorded from that package.
"""

from __future__ import annotations

from tools import check_vendor


def test_vendored_files_match_their_recorded_hashes_and_have_a_licence() -> None:
    for package in check_vendor.manifest():
        assert package["version"] in package["folder"]
        assert package["license"] == "Apache-2.0"
        assert check_vendor.recorded_problems(package) == []


def test_the_page_loads_only_vendored_runtime_files_of_the_recorded_version() -> None:
    device = (check_vendor.ROOT / "static" / "device.js").read_text()
    page = (check_vendor.ROOT / "templates" / "index.html").read_text()
    for package in check_vendor.manifest():
        assert f"/static/vendor/{package['folder']}/" in device + page
