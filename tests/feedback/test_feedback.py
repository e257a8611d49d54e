"""POST /feedback and GET /feedback/stats on a real SQLite file and a real PostgreSQL server.

Both databases are built by the Alembic migrations (`mnist_api.storage.db.upgrade`), as the release
phase does; PostgreSQL is a real server the tests start on a free port (tools/postgres_server.py)
and stop, to see /feedback answer 503 while /predict goes on.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import create_engine, func, inspect, select, text

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.extensions import CACHE, FEEDBACK, ROUTER, SERVICE
from mnist_api.feedback.store import FeedbackStore, decode_input
from mnist_api.http.auth import key_fingerprint
from mnist_api.imaging.preprocessing import preprocess
from mnist_api.inference.prediction_ids import input_digest
from mnist_api.inference.routing import SingleRouter
from mnist_api.storage import db
from mnist_api.storage.tables import feedback, metadata
from tests.samples import as_paper, encode, sample
from tools.postgres_server import PostgresServer, postgres_bin
from tools.services import API_KEYS, free_port

pytestmark = pytest.mark.timeout(120)


def digit_png(digit: int, size: int = 120) -> bytes:
    """A test-split digit as dark ink on white paper; `size` makes distinct uploads."""
    return encode(as_paper(sample(digit), size=size))


AUTO = "auto"


def signed_id(
    application: APIFlask, data: bytes, key: str = API_KEYS[0], now: float | None = None
) -> str:
    """The prediction id the service would give `key` for `data` answered by stable (signed
    with the app's own secret, without a /predict: rate-limit tests count every request)."""
    service = application.extensions[SERVICE]
    try:
        digest = input_digest(preprocess(data))
    except Exception:  # a bad upload: any valid id, the image's own error comes first
        digest = input_digest(preprocess(digit_png(1)))
    return str(
        service.ids.issue(
            version=service.router.stable,
            deployment=service.router.deployment_id,
            routed=True,
            client=key_fingerprint(key),
            digest=digest,
            now=now,
        )
    )


def post(
    client: FlaskClient,
    data: bytes | None,
    label: Any,
    key: str = API_KEYS[0],
    prediction_id: str | None = AUTO,
) -> Any:
    """POST /feedback; `prediction_id` AUTO signs one for `data` and `key` as /predict would."""
    body: dict[str, Any] = {}
    if prediction_id == AUTO:
        application = cast(APIFlask, client.application)
        prediction_id = signed_id(application, data or digit_png(1), key)
    if prediction_id is not None:
        body["prediction_id"] = prediction_id
    if label is not None:
        body["label"] = label
    if data is not None:
        body["file"] = (io.BytesIO(data), "digit.png")
    return client.post(
        "/feedback", data=body, headers={"x-api-key": key}, content_type="multipart/form-data"
    )


def stored_count(app: APIFlask) -> int:
    store: FeedbackStore = app.extensions[FEEDBACK]
    with store.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(feedback)).scalar_one())


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for this module, migrated by Alembic."""
    if postgres_bin() is None:
        pytest.fail("PostgreSQL is not installed: run scripts/install-system-deps.sh")
    server = PostgresServer(free_port())
    server.start()
    try:
        db.upgrade(server.url)
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def postgres_app(settings: Settings, postgres: PostgresServer) -> Iterator[APIFlask]:
    application = create_app(
        settings.replace(database_url=postgres.url, database_timeout_seconds=2.0)
    )
    application.config["TESTING"] = True
    yield application
    # Its deployment refresh reads this server: stop it before the server goes.
    application.extensions[ROUTER].close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_app(request: pytest.FixtureRequest, app: APIFlask) -> APIFlask:
    """The session app (SQLite file) or the PostgreSQL one."""
    chosen: APIFlask = app if request.param == "sqlite" else request.getfixturevalue("postgres_app")
    chosen.extensions[CACHE].clear()
    store: FeedbackStore = chosen.extensions[FEEDBACK]
    with store.engine.begin() as connection:
        connection.execute(feedback.delete())
    return chosen


def test_feedback_round_trip_and_replace(any_app: APIFlask) -> None:
    client = any_app.test_client()
    image = digit_png(7, size=131)
    predicted = client.post(
        "/predict", data={"file": (io.BytesIO(image), "d.png")}, headers={"x-api-key": API_KEYS[0]}
    ).get_json()

    first = post(client, image, "7", prediction_id=predicted["prediction_id"])
    assert first.status_code == 201, first.get_json()
    body = first.get_json()
    assert list(body) == [
        "feedback_id", "sha256", "input_digest", "label", "model_version", "predicted", "correct"
    ]  # fmt: skip
    assert body["label"] == 7
    assert body["model_version"] == predicted["model_version"]
    assert body["predicted"] == predicted["prediccion"] == 7
    assert body["correct"] is True
    assert first.headers["X-Model-Version"] == predicted["model_version"]

    # The same answer judged again: the label is replaced (200), one row stays.
    again = post(client, image, "1", prediction_id=predicted["prediction_id"])
    assert again.status_code == 200
    assert again.get_json()["feedback_id"] == body["feedback_id"]
    assert again.get_json()["correct"] is False
    # Another key judging the same image is another row; so is another image.
    assert post(client, image, "7", key=API_KEYS[1]).status_code == 201
    assert post(client, digit_png(3, size=90), "3").status_code == 201
    assert stored_count(any_app) == 3

    # What is kept: the normalised input the model saw, never the upload.
    store: FeedbackStore = any_app.extensions[FEEDBACK]
    columns = {c["name"] for c in inspect(store.engine).get_columns("feedback")}
    assert columns == {
        "id", "key_fingerprint", "sha256", "model_version", "label", "predicted",
        "correct", "probability", "input", "created_at", "updated_at", "routed",
    }  # fmt: skip
    with store.engine.connect() as connection:
        row = connection.execute(select(feedback).where(feedback.c.id == body["feedback_id"])).one()
    assert row.key_fingerprint == key_fingerprint(API_KEYS[0])
    assert row.sha256 == body["input_digest"] == input_digest(preprocess(image))
    assert row.label == 1 and row.predicted == 7 and row.correct is False
    assert len(row.input) == 28 * 28 * 2
    assert np.allclose(decode_input(row.input), preprocess(image), atol=1e-3)
    assert row.model_version == predicted["model_version"].rsplit("-", 1)[1]

    stats = client.get("/feedback/stats", headers={"x-api-key": API_KEYS[0]})
    assert stats.status_code == 200
    (version,) = stats.get_json()["versions"]
    assert version["model_version"] == predicted["model_version"]
    assert version["count"] == 3 and version["correct"] == 2
    assert version["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    confusion = np.array(version["confusion"])
    assert confusion.shape == (10, 10)
    assert confusion[7, 7] == 1 and confusion[1, 7] == 1 and confusion[3, 3] == 1


def test_the_version_credited_is_the_one_in_the_prediction_id(any_app: APIFlask) -> None:
    client = any_app.test_client()
    image = digit_png(2, size=97)
    predicted = client.post(
        "/predict", data={"file": (io.BytesIO(image), "d.png")}, headers={"x-api-key": API_KEYS[0]}
    ).get_json()
    response = post(client, image, "2", prediction_id=predicted["prediction_id"])
    assert response.status_code == 201
    assert response.get_json()["model_version"] == predicted["model_version"]


def test_the_store_remembers_whether_the_deployment_routed_the_answer(any_app: APIFlask) -> None:
    """Issue 21: a judgement of a pinned answer (`?model_version=`) trains but never gates,
    so the store keeps whether the deployment chose the version (from the prediction id)."""
    client = any_app.test_client()
    store: FeedbackStore = any_app.extensions[FEEDBACK]
    stable = any_app.extensions[SERVICE].router.stable
    judged: dict[str, bool] = {}
    for path, size in ((f"/predict?model_version={stable}", 83), ("/predict", 89)):
        image = digit_png(4, size=size)
        answer = client.post(
            path, data={"file": (io.BytesIO(image), "d.png")}, headers={"x-api-key": API_KEYS[0]}
        ).get_json()
        response = post(client, image, "4", prediction_id=answer["prediction_id"])
        assert response.status_code in (200, 201)
        judged[response.get_json()["input_digest"]] = "model_version" not in path
    stored = store.rows()
    found = {
        str(sha): bool(routed)
        for sha, routed in zip(stored.sha256, stored.routed, strict=True)
        if str(sha) in judged
    }
    assert found == judged


def test_same_pixels_in_other_bytes_count_once_per_key(app: APIFlask, client: FlaskClient) -> None:
    """A PNG text chunk changes the bytes (and the SHA-256), not the pixels: one row."""
    from PIL import PngImagePlugin  # noqa: PLC0415

    before = stored_count(app)
    picture = as_paper(sample(5), size=88)
    statuses = []
    for nonce in range(3):
        info = PngImagePlugin.PngInfo()
        info.add_text("nonce", str(nonce))
        out = io.BytesIO()
        picture.save(out, "PNG", pnginfo=info)
        statuses.append(post(client, out.getvalue(), "4").status_code)
    assert statuses == [201, 200, 200]
    assert stored_count(app) == before + 1


def test_prediction_id_errors_are_400_and_nothing_is_stored(
    app: APIFlask, client: FlaskClient
) -> None:
    image, other = digit_png(6, size=93), digit_png(0, size=93)
    valid = signed_id(app, image)
    expired = signed_id(
        app, image, now=time.time() - app.extensions[SERVICE].ids.max_age_seconds - 5
    )
    text, _, mac = valid.partition(".")
    forged = text[:-2] + ("A" if text[-2] != "A" else "B") + text[-1] + "." + mac
    before = stored_count(app)
    cases = [
        (None, API_KEYS[0], image, "invalid_prediction_id"),  # missing
        ("", API_KEYS[0], image, "invalid_prediction_id"),
        ("not-an-id", API_KEYS[0], image, "invalid_prediction_id"),
        (forged, API_KEYS[0], image, "invalid_prediction_id"),
        (expired, API_KEYS[0], image, "invalid_prediction_id"),
        (valid, API_KEYS[1], image, "invalid_prediction_id"),  # issued to another key
        (valid, API_KEYS[0], other, "prediction_mismatch"),  # another image
    ]
    for prediction_id, key, data, code in cases:
        response = post(client, data, "6", key=key, prediction_id=prediction_id)
        assert response.status_code == 400, (prediction_id, response.get_json())
        assert response.get_json()["code"] == code
    assert stored_count(app) == before
    assert post(client, image, "6", prediction_id=valid).status_code == 201


@pytest.mark.parametrize(
    "label", [None, "", "10", "-1", "3.5", "seven", "1e1", "\u0663", "99999999999999999999"]
)
def test_bad_label_is_400_invalid_label_and_nothing_is_stored(
    app: APIFlask, client: FlaskClient, label: str | None
) -> None:
    before = stored_count(app)
    response = post(client, digit_png(4), label)
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_label"
    assert stored_count(app) == before


def _blank() -> bytes:
    return encode(Image.new("L", (64, 64), 255))


@pytest.mark.parametrize(
    ("upload", "status", "code"),
    [
        (None, 400, "missing_file"),
        (b"", 400, "missing_file"),
        (b"\x89PNG\r\n\x1a\nnot really", 400, "invalid_image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_media_type"),
        ("blank", 422, "blank_image"),
    ],
)
def test_bad_image_gets_the_predict_error_and_nothing_is_stored(
    app: APIFlask, client: FlaskClient, upload: bytes | str | None, status: int, code: str
) -> None:
    data = _blank() if upload == "blank" else upload
    assert not isinstance(data, str)
    before = stored_count(app)
    response = post(client, data, "5")
    assert response.status_code == status, response.get_json()
    assert response.get_json()["code"] == code
    assert stored_count(app) == before


def test_no_key_is_401(app: APIFlask, client: FlaskClient) -> None:
    before = stored_count(app)
    unauthorized = client.post("/feedback", data={"label": "1"})
    assert unauthorized.status_code == 401
    assert client.get("/feedback/stats").status_code == 401
    assert stored_count(app) == before


def test_metrics_count_new_feedback_per_version(app: APIFlask, client: FlaskClient) -> None:
    version = app.extensions[SERVICE].model_version

    def count(correct: str) -> float:
        for line in client.get("/metrics").get_data(as_text=True).splitlines():
            if line.startswith(
                f'mnist_feedback_total{{correct="{correct}",model_version="{version}"}}'
            ) or line.startswith(
                f'mnist_feedback_total{{model_version="{version}",correct="{correct}"}}'
            ):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no mnist_feedback_total series for {version} correct={correct}")

    right, wrong = count("true"), count("false")  # pre-initialised: present before any
    image = digit_png(0, size=77)
    assert post(client, image, "0").status_code in (200, 201)
    assert post(client, digit_png(6, size=78), "5").get_json()["correct"] is False
    assert count("true") >= right and count("false") >= wrong + 1


class FeedbackRouter(SingleRouter):
    """A deployment that takes feedback, as the bandit and the guard of issue 12 do."""

    def __init__(self, version: str) -> None:
        super().__init__(version)
        self.judgements: list[tuple[str, bool]] = []

    def record_feedback(
        self, version: str, correct: bool, *, client: str = "", deployment: str = ""
    ) -> None:
        self.judgements.append((version, correct))


def test_new_feedback_reaches_the_router(app: APIFlask, client: FlaskClient) -> None:
    service = app.extensions[SERVICE]
    original = service.router
    router = service.router = FeedbackRouter(original.stable)
    try:
        image = digit_png(8, size=101)
        post(client, image, "8", key=API_KEYS[1])
        post(client, image, "3", key=API_KEYS[1])  # a replacement is not a new judgement
    finally:
        service.router = original
    assert len(router.judgements) <= 1
    assert all(version == original.stable for version, _ in router.judgements)


def test_sqlite_locked_is_503_and_nothing_half_written(settings: Settings, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    db.upgrade(url)
    application = create_app(settings.replace(database_url=url, database_timeout_seconds=0.3))
    client = application.test_client()
    blocker = sqlite3.connect(tmp_path / "feedback.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file
    try:
        response = post(client, digit_png(9), "9")
        assert response.status_code == 503
        assert response.get_json()["code"] == "feedback_unavailable"
        predicted = client.post(
            "/predict",
            data={"file": (io.BytesIO(digit_png(9)), "d.png")},
            headers={"x-api-key": API_KEYS[0]},
        )
        assert predicted.status_code == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert stored_count(application) == 0
    assert post(client, digit_png(9), "9").status_code == 201
    assert stored_count(application) == 1


def test_sqlite_unusable_is_503_and_readyz_says_down(settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    application = create_app(settings.replace(database_url=f"sqlite:///{blocker / 'feedback.db'}"))
    client = application.test_client()
    response = post(client, digit_png(5), "5")
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["code"] == "feedback_unavailable"
    assert client.get("/feedback/stats", headers={"x-api-key": API_KEYS[0]}).status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["database"] == "down"


def test_readyz_reports_the_embedded_database(client: FlaskClient) -> None:
    assert client.get("/readyz").get_json()["database"] == "sqlite"


def test_postgres_down_is_503_predict_unaffected_and_back(
    postgres: PostgresServer, postgres_app: APIFlask
) -> None:
    client = postgres_app.test_client()
    assert client.get("/readyz").get_json()["database"] == "ok"
    postgres.stop()
    try:
        response = post(client, digit_png(4, size=111), "4")
        assert response.status_code == 503
        assert response.get_json()["code"] == "feedback_unavailable"
        assert "postgres" not in response.get_data(as_text=True).lower()
        predicted = client.post(
            "/predict",
            data={"file": (io.BytesIO(digit_png(4)), "d.png")},
            headers={"x-api-key": API_KEYS[0]},
        )
        assert predicted.status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json()["database"] == "down"
    finally:
        postgres.start()
    # The pool notices the restart (pre-ping): the next feedback is stored.
    assert post(client, digit_png(4, size=112), "4").status_code == 201
    assert client.get("/readyz").get_json()["database"] == "ok"


def test_postgres_schema_comes_from_alembic(postgres: PostgresServer) -> None:
    assert_schema_is_the_tables(postgres.url)


def test_sqlite_schema_comes_from_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    db.upgrade(url)
    assert_schema_is_the_tables(url)


def assert_schema_is_the_tables(url: str) -> None:
    """At the newest revision, and exactly the tables mnist_api/storage/tables.py describes (the
    deployment's three tables of issue 21 included): Alembic finds nothing to change."""
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    head = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()
    engine = create_engine(db.normalize_url(url))
    try:
        with engine.connect() as connection:
            revision = connection.execute(text("select version_num from alembic_version"))
            assert revision.scalar_one() == head
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        names = set(inspect(engine).get_table_names())
        assert {"feedback", "candidate_proposals"} <= names
        assert {"deployment_state", "deployment_history", "deployment_counts"} <= names
    finally:
        engine.dispose()


def test_heroku_url_is_rewritten_for_psycopg() -> None:
    assert db.normalize_url("postgres://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert db.normalize_url("postgresql://h/d") == "postgresql+psycopg://h/d"
    assert db.normalize_url("").startswith("sqlite:///")
    assert db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_feedback_is_rate_limited_per_key(settings: Settings) -> None:
    application = create_app(settings.replace(rate_limit="2/minute"))
    client = application.test_client()
    statuses = [post(client, digit_png(1, size=60 + n), "1").status_code for n in range(3)]
    assert statuses == [201, 201, 429]
    limited = post(client, digit_png(1, size=70), "1")
    assert limited.get_json()["code"] == "rate_limited"
    assert limited.headers.get("Retry-After")


def test_openapi_documents_feedback(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    operation = paths["/feedback"]["post"]
    assert {"200", "201", "400", "503"} <= set(operation["responses"])
    body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "label" in str(body) or "$ref" in body
    assert "get" in paths["/feedback/stats"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_build_exactly_the_tables_the_code_uses(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Alembic's autogenerate finds nothing to add: mnist_api/storage/tables.py == migrations."""
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

    from mnist_api.storage.tables import metadata  # noqa: PLC0415

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'feedback.db'}"
        db.upgrade(url)
    else:
        url = request.getfixturevalue("postgres").url
    engine = create_engine(db.normalize_url(url))
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("cached", [False, True])
def test_async_and_batch_answers_carry_ids_for_the_asking_key(
    app: APIFlask, client: FlaskClient, cached: bool
) -> None:
    """A task's result (computed by the task, or cached when it was queued) and each entry
    of a batch: their prediction ids judge those answers for the key that asked."""
    image = digit_png(3, size=141 + cached)
    headers = {"x-api-key": API_KEYS[1]}
    if cached:
        client.post("/predict", data={"file": (io.BytesIO(image), "d.png")}, headers=headers)
    accepted = client.post(
        "/predict_async", data={"file": (io.BytesIO(image), "d.png")}, headers=headers
    )
    assert accepted.status_code == 202, accepted.get_json()
    status = client.get(accepted.get_json()["status_url"], headers=headers).get_json()
    assert status["state"] == "SUCCESS", status
    result = status["result"]
    assert result["cached"] is cached
    assert (
        post(client, image, "3", key=API_KEYS[0], prediction_id=result["prediction_id"]).get_json()[
            "code"
        ]
        == "invalid_prediction_id"
    )
    judged = post(client, image, "3", key=API_KEYS[1], prediction_id=result["prediction_id"])
    assert judged.status_code in (200, 201), judged.get_json()
    batch = client.post(
        "/predict/batch",
        data={"files": [(io.BytesIO(image), "a.png"), (io.BytesIO(digit_png(8)), "b.png")]},
        headers=headers,
    ).get_json()
    first, second = batch["predictions"]
    assert first["prediction_id"] and second["prediction_id"]
    again = post(client, image, "3", key=API_KEYS[1], prediction_id=first["prediction_id"])
    assert again.status_code == 200  # the same key, pixels and version: the label is replaced
