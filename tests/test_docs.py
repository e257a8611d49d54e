"""The README is the landing page; the manual is the MkDocs site under docs/.

`make docs` (part of `make test`) builds the site with `mkdocs build --strict`, which fails on
a broken link or anchor and on a page missing from the nav; these tests keep the landing page
short, its two commands first, and every setting documented with its default.
"""

from __future__ import annotations

import json
import re

from mnist_api.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
README_MAX_LINES = 250
TWO_COMMANDS = (
    "```bash\n"
    "make run    # set up and serve on http://127.0.0.1:8000 (prints the dev API key)\n"
    "make test   # set up and run lint, type checks and the whole test suite\n"
    "```\n"
)


def test_readme_is_a_landing_page_of_at_most_250_lines() -> None:
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_readme_starts_with_the_two_commands() -> None:
    title, _, rest = README.read_text().partition("\n\n")
    assert title.startswith("# ")
    assert rest.startswith(TWO_COMMANDS)


def test_readme_shows_the_page_and_links_every_page_of_the_manual() -> None:
    readme = README.read_text()
    assert "![The page with an answer computed on this device](docs/page-on-device.png)" in readme
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)(?:#[^)]*)?\)", readme))
    pages = {path.name for path in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= linked, sorted(pages - linked)


def test_readme_links_point_at_files_that_exist() -> None:
    for target in re.findall(r"\]\(((?!https?:|#|<)[^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        assert (PROJECT_ROOT / target).exists(), target


def test_every_setting_in_app_json_is_in_the_settings_table() -> None:
    """Every setting a deployer can set (app.json) has a row with its default."""
    settings = json.loads((PROJECT_ROOT / "app.json").read_text())["env"]
    table = (DOCS / "limits.md").read_text()
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, re.MULTILINE))
    assert set(settings) <= rows, sorted(set(settings) - rows)


def test_the_site_config_builds_into_an_ignored_folder() -> None:
    """`mkdocs build` writes build/site/, which git ignores (/build/)."""
    config = (PROJECT_ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^site_dir: build/site$", config, re.MULTILINE)
    assert re.search(r"^strict: true$", config, re.MULTILINE)
    assert "/build/" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\bdocs\b", makefile, re.MULTILINE)
    assert "mkdocs build --strict" in makefile
