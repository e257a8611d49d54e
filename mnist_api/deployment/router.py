"""The deployment in each worker: per-request choice of the version, and a background loop.

The hot path (`route`, `observe`, `record_feedback`) only reads the deployment object this
process holds and adds to in-process counters: no database round trip per request. A daemon
thread, every `DEPLOYMENT_REFRESH_SECONDS` (1 s by default):

1. flushes the counters to the store (one transaction of upserts per version and field);
2. reads the stored deployment and switches to it if its id changed (so a change made on any
   worker or dyno, or by the CLI, is in force everywhere within a couple of seconds; with
   Redis, a change announced on its pub/sub channel wakes the loop at once);
3. reads the deployment's counts summed over every worker and turns them into evidence (the
   bandit's posteriors and the guard's statistics): counts are kept per version and key
   fingerprint (store field `<version>/<key>:<field>`), each key capped at
   EVIDENCE_MAX_SHARE_PER_KEY of each statistic, none from fewer than EVIDENCE_MIN_KEYS keys
   (mnist_api/deployment/evidence.py). Only routed answers are observed (the service never reports a
   pinned one), each (key, input) once per process (`_seen`) and each judged answer once
   (the feedback store's row per key, input and version);
4. runs the guard (and auto-promotion when enabled); the change is a compare-and-set on the
   deployment id, so when several workers decide at once exactly one writes it.

When the store (the database) fails, the process keeps serving with the last deployment it
read, keeps its counters for the next flush, logs the outage once, and says so in /readyz
(`"deployment": "stale"`). A stored deployment that names a
version this process does not have installed (a dyno running older code) is served as
well as it can be: stable if installed, else the default version, without the candidate;
logged once per deployment.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from loguru import logger

from mnist_api import metrics
from mnist_api.deployment.counts import KEY_SEPARATOR, AutoPromote, per_key
from mnist_api.deployment.evidence import EvidenceRules
from mnist_api.deployment.guard import (
    VersionStats,
    guard_verdict,
    promotion_verdict,
    thompson_picks_candidate,
)
from mnist_api.deployment.manager import DeploymentManager
from mnist_api.deployment.notify import ChangeNotifier
from mnist_api.deployment.store import CountKey, Counts
from mnist_api.deployment.value import GUARDED, Deployment, ab_position
from mnist_api.errors import DeploymentStoreUnavailable
from mnist_api.inference.registry import short_version
from mnist_api.inference.routing import Route

# Counters kept while the store is down are capped per key; beyond that they are dropped
# (they only feed statistics, never an answer).
_MAX_PENDING = 10_000_000
# Inputs already counted per (deployment, version, key), as one int hash each (~60 bytes:
# 3 MB at most per worker); forgotten all at once beyond this many (a repeat after that
# counts again, still capped with its key's share).
_MAX_SEEN = 50_000


class DeploymentRouter:
    """Implements the service's `Router` with the deployment of the store."""

    def __init__(
        self,
        manager: DeploymentManager,
        *,
        full_version: Callable[[str], str] = str,
        refresh_seconds: float = 1.0,
        auto_promote: AutoPromote | None = None,
        evidence: EvidenceRules | None = None,
        seed: int | None = None,
        notifier: ChangeNotifier | None = None,
    ) -> None:
        self.manager = manager
        self.evidence = evidence or EvidenceRules()
        self.notifier = notifier  # Redis pub/sub: re-read at once when told of a change
        self.refresh_seconds = refresh_seconds
        self.auto_promote = auto_promote or AutoPromote()
        self._full_version = full_version  # short id -> `mnist-cnn-int8-<id>` (metric labels)
        self._rng = random.Random(seed)  # noqa: S311 - traffic splitting, not secrets
        self._lock = threading.Lock()
        self._pending: Counter[CountKey] = Counter()
        self._synced: Counts = {}
        # version -> its evidence under the deployment in force; swapped in whole after each
        # flush and read, so `route()` (the bandit) never computes caps per request.
        self._evidence: dict[str, VersionStats] = {}
        self._seen: set[int] = set()
        self._stored = Deployment.initial(manager.default_stable)
        self._deployment = self._stored  # what this process serves (installed versions only)
        self._warned: set[str] = set()
        self._published = False
        self._store_down = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # a change was announced: refresh now
        self._thread: threading.Thread | None = None
        self._thread_pid = 0

    # --- the Router protocol (hot path) ---

    @property
    def deployment(self) -> Deployment:
        """The deployment this process serves right now."""
        return self._deployment

    @property
    def stable(self) -> str:
        """The stable version."""
        return self._deployment.stable

    @property
    def deployment_id(self) -> str:
        """The id of the deployment this process serves."""
        return self._deployment.id

    def route(self, client: str) -> Route:
        """The version that answers this request, and the one scoring it in the shadow."""
        self._ensure_running()
        deployment = self._deployment
        candidate = deployment.candidate
        if candidate is None or deployment.strategy == "single":
            return Route(deployment.stable, deployment=deployment.id)
        if deployment.strategy == "shadow":
            return Route(deployment.stable, shadow=candidate, deployment=deployment.id)
        if deployment.strategy == "canary":
            chosen = self._rng.random() < deployment.candidate_share
        elif deployment.strategy == "ab":
            chosen = ab_position(client, deployment.id) < deployment.candidate_share
        else:  # bandit
            chosen = thompson_picks_candidate(
                self._rng,
                self._stats(deployment.id, deployment.stable),
                self._stats(deployment.id, candidate),
                deployment.min_share,
            )
        return Route(candidate if chosen else deployment.stable, deployment=deployment.id)

    def roles(self) -> dict[str, str]:
        """`{stable: "stable", candidate: "candidate"}` of the deployment in force."""
        deployment = self._deployment
        roles = {deployment.stable: "stable"}
        if deployment.candidate is not None:
            roles[deployment.candidate] = "candidate"
        return roles

    def observe(
        self, version: str, client: str, answers: Sequence[tuple[str, bool]], errors: int = 0
    ) -> None:
        """Count routed answers of `version` to the key `client`, as (input digest,
        low-confidence) pairs, each (key, input) once; and `errors` failed inferences."""
        deployment = self._deployment
        if deployment.candidate is None:
            return  # nothing to compare, nothing to flush
        short = short_version(version)
        key = deployment.id, short + KEY_SEPARATOR + client
        with self._lock:
            if len(self._seen) > _MAX_SEEN:
                self._seen.clear()
            answered = low = 0
            for digest, low_confidence in answers:
                seen = hash((deployment.id, short, client, digest))
                if seen in self._seen:
                    continue  # the same pixels from the same key: one piece of evidence
                self._seen.add(seen)
                answered += 1
                low += low_confidence
            counted = (("requests", answered), ("low_confidence", low), ("errors", errors))
            for name, count in counted:
                if count:
                    self._pending[(*key, name)] += count

    def record_feedback(
        self, version: str, correct: bool, *, client: str = "", deployment: str = ""
    ) -> None:
        """Count one judged answer of `version` (short or full id) to the key `client` under
        `deployment` (the one in force when it answered; default: the current one): the
        bandit's and the guard's evidence. Cheap: in-process, flushed by the background
        thread. The caller counts each (key, input, version) once."""
        key = deployment or self._deployment.id, short_version(version) + KEY_SEPARATOR + client
        with self._lock:
            self._pending[(*key, "feedback")] += 1
            if correct:
                self._pending[(*key, "correct")] += 1

    def store_status(self) -> str:
        """For /readyz: "ok" when the last read of the store worked; "stale" when the store is
        down and this worker serves the deployment it last read."""
        return "stale" if self._store_down else "ok"

    # --- keeping up with the store ---

    def use(self, stored: Deployment) -> None:
        """Serve `stored` from now on (it came from the store, or this process wrote it)."""
        if self._published and stored == self._stored:
            return
        self._published = True
        served = self._servable(stored)
        self._stored = stored
        if served.id != self._deployment.id:
            with self._lock:
                self._synced = {}
                self._evidence = {}
                self._seen = set()
        self._deployment = served
        metrics.set_model_version(self._full_version(served.stable))
        metrics.set_deployment(
            served.id,
            served.strategy,
            self._full_version(served.stable),
            self._full_version(served.candidate) if served.candidate else "",
        )
        logger.info(
            "deployment {} in force: {} stable {} candidate {}",
            served.id,
            served.strategy,
            served.stable,
            served.candidate,
        )

    def start(self) -> None:
        """Read the stored deployment now (the default if the store is down) and start the
        background refresh in this process."""
        try:
            self.use(self.manager.current())
        except DeploymentStoreUnavailable:
            self._store_failed()
            self.use(self._stored)
        self._ensure_running()

    def close(self) -> None:
        """Stop the background thread (tests; a worker just exits)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def sync(self) -> None:
        """One round of the background loop (also called directly by tests)."""
        try:
            self._flush()
            stored = self.manager.current()
            self.use(stored)
            counts = self.manager.store.counts(stored.id)
            with self._lock:
                self._synced = counts
                self._evidence = self._weigh(counts)
            self._judge(stored)
        except DeploymentStoreUnavailable:
            self._store_failed()
            return
        if self._store_down:
            self._store_down = False
            logger.info("deployment store answers again")

    def _ensure_running(self) -> None:
        # A forked process (a Celery prefork child) inherits no threads: start one there.
        if self._thread_pid == os.getpid() or self._stop.is_set():
            return
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            self._thread_pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="deployment-sync", daemon=True)
            self._thread.start()
            if self.notifier is not None:
                threading.Thread(
                    target=self.notifier.listen,
                    args=(self._wake.set, self._stop),
                    name="deployment-notify",
                    daemon=True,
                ).start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.refresh_seconds)  # the tick, or a change announced
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except Exception as error:  # the loop must outlive any surprise
                logger.opt(exception=error).error("deployment refresh failed")

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            self.manager.store.add_counts(pending)
        except DeploymentStoreUnavailable:
            with self._lock:
                for key, count in pending.items():
                    self._pending[key] = min(self._pending[key] + count, _MAX_PENDING)
            raise
        with self._lock:  # until the next read, the flushed counts stay visible here
            # A new mapping, swapped in whole: `route()` reads `_synced` without the lock.
            merged = {version: dict(fields) for version, fields in self._synced.items()}
            for (deployment_id, version, name), count in pending.items():
                if deployment_id == self._deployment.id:
                    fields = merged.setdefault(version, {})
                    fields[name] = fields.get(name, 0) + count
            self._synced = merged
            self._evidence = self._weigh(merged)

    def _judge(self, stored: Deployment) -> None:
        """The guard, then auto-promotion, on the counts of every worker."""
        if stored.strategy not in GUARDED or stored.candidate is None:
            return
        if stored != self._deployment:
            return  # serving a stand-in for a deployment this process cannot run
        stable = self._stats(stored.id, stored.stable)
        candidate = self._stats(stored.id, stored.candidate)
        verdict = guard_verdict(stable, candidate, stored.effective_guard(self.manager.guard))
        if verdict is not None:
            new = dataclasses.replace(stored, candidate=None, strategy="single")
            written = self.manager.replace_if_current(
                stored, new, by="guard", reason="guard", detail=verdict.detail
            )
            if written is not None:
                metrics.GUARD_ROLLBACKS.labels(signal=verdict.signal).inc()
                logger.warning(
                    "guard rolled back candidate {} of deployment {}: {}",
                    stored.candidate,
                    stored.id,
                    verdict.detail,
                )
                self.use(written)
            return
        if not self.auto_promote.enabled:
            return
        promotion = promotion_verdict(
            stable, candidate, self.auto_promote.min_feedback, self.auto_promote.probability
        )
        if promotion is None:
            return
        new = dataclasses.replace(
            stored,
            stable=stored.candidate,
            candidate=None,
            strategy="single",
            previous_stable=stored.stable,
        )
        written = self.manager.replace_if_current(
            stored, new, by="guard", reason="auto_promote", detail=promotion.detail
        )
        if written is not None:
            metrics.AUTO_PROMOTIONS.inc()
            logger.warning(
                "candidate {} promoted by itself: {}", stored.candidate, promotion.detail
            )
            self.use(written)

    def _stats(self, deployment_id: str, version: str) -> VersionStats:
        """The evidence on `version` from every worker's counts at the last flush or read
        (capped per key: mnist_api/deployment/evidence.py)."""
        return self._evidence.get(version) or VersionStats()

    def _weigh(self, counts: Counts) -> dict[str, VersionStats]:
        """Each version's statistics from its per-key counts, under the evidence rules."""
        return {
            version: VersionStats.from_keys(keys, self.evidence)
            for version, keys in per_key(counts).items()
        }

    def _servable(self, stored: Deployment) -> Deployment:
        """`stored` if this process has its versions installed, else the closest it can do."""
        installed = self.manager.installed
        missing = [v for v in (stored.stable, stored.candidate) if v and v not in installed]
        if not missing:
            return stored
        if stored.id not in self._warned:
            self._warned.add(stored.id)
            logger.warning(
                "deployment {} names version(s) {} not installed here; serving {}",
                stored.id,
                ", ".join(missing),
                stored.stable if stored.stable in installed else self.manager.default_stable,
            )
        stable = stored.stable if stored.stable in installed else self.manager.default_stable
        return dataclasses.replace(stored, stable=stable, candidate=None, strategy="single")

    def _store_failed(self) -> None:
        if not self._store_down:
            self._store_down = True
            logger.warning(
                "deployment store unavailable: serving deployment {} until it answers",
                self._deployment.id,
            )
