"""The Procfile's Celery worker with two test-only fault hooks (tests start it instead of
`make_celery`, with the Procfile's own command line otherwise):

- TASK_DELAY_SECONDS: each task sleeps this long before it predicts, so a test can catch it
  running (kill its worker, hit a time limit);
- TASK_CRASH_ON_SHA256: a task holding this upload makes its worker process exit, as a decoder
  crash or the kernel's OOM killer would (the poison-message tests).

They wrap the task bodies' `_outcomes` (called after the delivery was counted, exactly where
the hooks used to sit in production code), so the production modules carry no test switch.
"""

from __future__ import annotations

import os
import time
from typing import Any

from loguru import logger

from make_celery import celery_app, flask_app
from mnist_api.jobs import tasks

__all__ = ["celery_app", "flask_app"]

_DELAY = float(os.environ.get("TASK_DELAY_SECONDS", "0") or 0)
_POISON = os.environ.get("TASK_CRASH_ON_SHA256", "").strip().lower()
_outcomes = tasks._outcomes


def _outcomes_with_faults(sha256s: list[str], *args: Any, **kwargs: Any) -> list[Any]:
    if _DELAY > 0:
        time.sleep(_DELAY)
    if _POISON and _POISON in sha256s:
        logger.warning("TASK_CRASH_ON_SHA256: this worker process exits now")
        os._exit(70)
    return _outcomes(sha256s, *args, **kwargs)


tasks._outcomes = _outcomes_with_faults
