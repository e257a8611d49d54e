"""The monitoring files, checked for real.

promtool validates the Prometheus config and the alert rules (and the dashboard's PromQL),
and every metric the alerts and the Grafana dashboard query must exist on the `/metrics` of
the real service (gunicorn from the Procfile) after a few real requests.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from mnist_api.config import PROJECT_ROOT
from tools.services import LiveServer

MONITORING = PROJECT_ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
DASHBOARD_JSON = MONITORING / "grafana-dashboard.json"

DATASOURCE = "${datasource}"

# The alert kinds the service needs, by the rule names in alerts.yml.
REQUIRED_ALERTS = {
    "5xx ratio too high": "MnistApiHigh5xxRatio",
    "p99 latency of /predict too high": "MnistApiPredictLatencyP99High",
    "cache degraded": "MnistApiCacheDegraded",
    "cache hit ratio dropped": "MnistApiCacheHitRatioDropped",
    "low-confidence ratio spike": "MnistApiLowConfidenceSpike",
    "no traffic": "MnistApiNoTraffic",
}

# Panels the dashboard must have: each pattern must match at least one panel title.
REQUIRED_PANELS = {
    "request rate by route": r"request rate by route",
    "latency quantiles": r"latency quantiles.*p50.*p90.*p99",
    "error ratio by contract code": r"error ratio by contract code",
    "cache hit ratio": r"^cache hit ratio$",
    "predictions per digit": r"predictions per digit",
    "confidence distribution": r"confidence distribution",
    "low-confidence ratio": r"low-confidence ratio",
    "in-flight requests": r"^in-flight requests$",
    "inference and preprocessing latency": r"inference and preprocessing latency",
    "model version": r"model version",
}

# Series and labels Prometheus itself adds at scrape time, never in the exposition.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SCRAPE_LABELS = {"job", "instance"}


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


PROMQL_FUNCTIONS = words(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
    """
)
PROMQL_AGGREGATORS = words(
    "avg bottomk count count_values group limitk limit_ratio max min quantile stddev stdvar"
    " sum topk"
)
PROMQL_KEYWORDS = words(
    "and or unless by without on ignoring group_left group_right bool offset atan2 inf nan"
)

# Grafana's interval variables become a duration, any other variable a match-all regex.
GRAFANA_INTERVALS = {"__rate_interval", "__interval", "__range", "__auto"}
GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
SELECTOR = re.compile(r"\{[^{}]*\}")
RANGE = re.compile(r"\[[^\[\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?")
NAMED_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"""([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*["'`]""")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)")


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by plain PromQL."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name in GRAFANA_INTERVALS else ".+"

    return GRAFANA_VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, or labels)."""
    text = STRING.sub('""', grafana_to_promql(expr))  # label values, regexes
    text = SELECTOR.sub("{}", text)  # label matchers
    text = RANGE.sub("[]", text)  # ranges, subqueries: durations and steps
    text = GROUPING.sub(" ", text)  # by (le), on () group_left (...)
    names = set()
    for match in IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call:
            known = word in PROMQL_FUNCTIONS or word.lower() in PROMQL_AGGREGATORS
            assert known, f"unknown PromQL function {word!r} in {expr!r}"
        elif word.lower() not in PROMQL_KEYWORDS | PROMQL_AGGREGATORS:
            names.add(word)
    return names


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """For each `metric{...}` selector, the label names its matchers use."""
    labels: dict[str, set[str]] = {}
    for match in NAMED_SELECTOR.finditer(grafana_to_promql(expr)):
        used = set(MATCHER_LABEL.findall(match.group(2)))
        labels.setdefault(match.group(1), set()).update(used)
    return labels


# --- alerts.yml, read without a YAML library (promtool's rule count cross-checks it) ---

RULE_START = re.compile(r"^\s*- (alert|record):\s*(\S+)\s*$", re.MULTILINE)


def yaml_value(block: str, key: str) -> str | None:
    """The value of `key:` in one rule: inline (plain or quoted) or a `|`/`>` block scalar."""
    lines = block.splitlines()
    for index, line in enumerate(lines):
        match = re.match(rf"^(\s*){key}:\s*(.*?)\s*$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2)
        if value[:1] in ("|", ">"):
            body = []
            for following in lines[index + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following.strip())
            return "\n".join(body).strip()
        if value[:1] in ("'", '"'):
            return value[1:-1]
        return value
    return None


def rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml: kind, name, expr, and the keys it sets."""
    text = ALERTS_YML.read_text()
    starts = list(RULE_START.finditer(text))
    found = []
    for number, start in enumerate(starts):
        end = starts[number + 1].start() if number + 1 < len(starts) else len(text)
        block = text[start.start() : end]
        found.append(
            {
                "kind": start.group(1),
                "name": start.group(2),
                "expr": yaml_value(block, "expr"),
                "for": yaml_value(block, "for"),
                "severity": yaml_value(block, "severity"),
                "annotations": {
                    key for key in ("summary", "description", "runbook") if yaml_value(block, key)
                },
            }
        )
    return found


# --- the dashboard ---


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return loaded


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(board) if panel["type"] != "row"]


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in query_panels(board) for target in panel["targets"]]


# --- promtool ---


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run scripts/install-system-deps.sh "
            "(Debian package 'prometheus')"
        )
    return path


def run(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_promtool_accepts_the_config_and_the_rules_it_loads(promtool: str) -> None:
    result = run(promtool, "check", "config", PROMETHEUS_YML)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "alerts.yml" in output  # the rule file was found and checked too
    assert "1 rule files found" in output


def test_promtool_accepts_the_alert_rules(promtool: str, tmp_path: Path) -> None:
    result = run(promtool, "check", "rules", ALERTS_YML)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    counted = re.search(r"SUCCESS: (\d+) rules found", output)
    assert counted, output
    # The rule reader of this file saw every rule promtool saw, and read each expr whole.
    assert int(counted.group(1)) == len(rules())
    check_promql(promtool, [rule["expr"] for rule in rules()], tmp_path)


def test_the_scrape_job_points_at_the_service() -> None:
    text = PROMETHEUS_YML.read_text()
    assert re.search(r"^\s*- job_name:\s*mnist-api\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*metrics_path:\s*/metrics\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*- targets:\s*\[\"web:8000\"\]", text, re.MULTILINE)
    assert re.search(r"^\s*- alerts\.yml\b", text, re.MULTILINE)
    assert "herokuapp.com" in text and "scheme: https" in text
    assert "METRICS_TOKEN" in text


def test_the_documented_bearer_token_block_works_uncommented(promtool: str, tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret")
    lines = PROMETHEUS_YML.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# authorization:")
    block = [line.replace("# ", "", 1) for line in lines[start : start + 3]]
    assert [line.split(":")[0].strip() for line in block] == [
        "authorization",
        "type",
        "credentials_file",
    ]
    block[2] = re.sub(r"credentials_file:.*", f"credentials_file: {token_file}", block[2])
    config = tmp_path / "prometheus.yml"
    config.write_text("\n".join([*lines[:start], *block, *lines[start + 3 :]]) + "\n")
    shutil.copy(ALERTS_YML, tmp_path / "alerts.yml")

    result = run(promtool, "check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    token_file.unlink()  # proof that the block is live: now promtool must refuse it
    assert run(promtool, "check", "config", config).returncode != 0


def test_every_alert_kind_is_there_with_for_severity_and_annotations() -> None:
    alerts = {rule["name"]: rule for rule in rules() if rule["kind"] == "alert"}
    missing = {kind: name for kind, name in REQUIRED_ALERTS.items() if name not in alerts}
    assert not missing, f"alerts missing from alerts.yml: {missing}"
    for name, rule in alerts.items():
        assert rule["expr"], name
        assert re.fullmatch(r"\d+[smhdw]", rule["for"] or ""), f"{name}: no `for:`"
        assert rule["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"] == {"summary", "description", "runbook"}, name


def test_the_dashboard_is_importable_json_with_the_panels_we_need() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    panels = list(all_panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all({"x", "y", "w", "h"} <= panel["gridPos"].keys() for panel in panels)

    titles = [panel["title"].lower() for panel in query_panels(board)]
    missing = [
        what
        for what, pattern in REQUIRED_PANELS.items()
        if not any(re.search(pattern, title) for title in titles)
    ]
    assert not missing, f"panels missing: {missing}; titles: {titles}"


def test_every_dashboard_query_uses_the_datasource_variable() -> None:
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in query_panels(board):
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
            assert target["expr"].strip(), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE, variable["name"]


def check_promql(promtool: str, exprs: list[str], folder: Path) -> None:
    """promtool's PromQL parser accepts every expression (each becomes a recording rule)."""
    recorded = [
        {"record": f"check:query_{number}", "expr": grafana_to_promql(expr)}
        for number, expr in enumerate(exprs)
    ]
    rules_file = folder / "queries.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "check", "rules": recorded}]}))
    result = run(promtool, "check", "rules", rules_file)  # JSON is YAML
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    check_promql(promtool, dashboard_exprs(dashboard()), tmp_path)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{url_rule="/p(x)", le!="1"}[5m])))',
            {"a_bucket"},
        ),
        ("sum(rate(b_total[$__rate_interval])) / on() group_left() sum(c)", {"b_total", "c"}),
        ('count(count by (model_version) (d{job=~"$job"})) > 1e3', {"d"}),
        ("sum without (instance) (e offset 1h) > bool 0 and f unless g", {"e", "f", "g"}),
        ("sum(rate(h[1d] offset 1h)) or absent(i) or vector(0)", {"h", "i"}),
        ("max(mnist:cache_hit_ratio:rate5m)", {"mnist:cache_hit_ratio:rate5m"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_an_unknown_function_is_an_error_not_a_metric() -> None:
    with pytest.raises(AssertionError, match="hisogram_quantile"):
        metric_names("hisogram_quantile(0.9, x)")


# --- the live service ---


def digit_png() -> bytes:
    """A '7' drawn with dark ink on white paper, as a user might upload it."""
    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).line([(50, 40), (150, 40), (90, 170)], fill=0, width=16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exposition(live_server: LiveServer) -> dict[str, set[str]]:
    """After a few real requests, every sample name on /metrics with its label names."""
    url = f"{live_server.url}/predict"
    headers = {"x-api-key": live_server.api_key, "Content-Type": "image/png"}
    png = digit_png()
    with requests.Session() as session:  # one keep-alive connection: one worker, so a hit
        first = session.post(url, data=png, headers=headers, timeout=10)
        assert first.status_code == 200, first.text
        again = session.post(url, data=png, headers=headers, timeout=10)
        assert again.status_code == 200, again.text
        noise = random.Random(0).randbytes(512)
        bad = session.post(url, data=noise, headers=headers, timeout=10)
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_image")
        wrong_key = {**headers, "x-api-key": "not-a-key"}
        denied = session.post(url, data=png, headers=wrong_key, timeout=10)
        assert (denied.status_code, denied.json()["code"]) == (401, "unauthorized")

    response = requests.get(f"{live_server.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    assert samples, (
        f"/metrics of the live service is empty ({len(response.text)} bytes) after "
        f"{first.headers.get('X-Cache')}/{again.headers.get('X-Cache')} predictions: "
        "under gunicorn that means no worker wrote its samples to PROMETHEUS_MULTIPROC_DIR"
    )
    return samples


def used_exprs() -> dict[str, str]:
    """Every PromQL expression of the alerts and the dashboard, keyed by where it is."""
    exprs = {f"alert {r['name']}": r["expr"] for r in rules() if r["expr"]}
    board = dashboard()
    for panel in query_panels(board):
        for target in panel["targets"]:
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            exprs[f"variable {variable['name']}"] = " ".join(LABEL_VALUES.findall(text))
    return exprs


def test_every_metric_in_alerts_and_dashboard_is_exposed(
    exposition: dict[str, set[str]],
) -> None:
    exprs = used_exprs()
    used = set().union(*(metric_names(expr) for expr in exprs.values()))
    exposed = set(exposition)
    unknown = used - exposed - SCRAPE_SERIES
    where = {name: [k for k, e in exprs.items() if name in metric_names(e)] for name in unknown}
    assert not unknown, (
        f"metrics used but not exposed: {sorted(unknown)}\n  used in: {where}\n"
        f"used: {sorted(used)}\nexposed: {sorted(exposed)}"
    )
    # Sanity: the reader found the metrics the rules are about.
    assert {"flask_http_request_duration_seconds_bucket", "mnist_cache_degraded"} <= used


def test_every_label_matched_on_exists_on_its_metric(
    exposition: dict[str, set[str]],
) -> None:
    wrong = {}
    for where, expr in used_exprs().items():
        for metric, labels in matcher_labels(expr).items():
            if metric in exposition:
                extra = labels - exposition[metric] - SCRAPE_LABELS
                if extra:
                    wrong[f"{where}: {metric}"] = sorted(extra)
    assert not wrong, f"label matchers on labels the metric does not have: {wrong}"
