"""A gunicorn logger class that sends gunicorn's error and access logs through loguru."""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from mnist_api.logs import InterceptHandler


class LoguruGunicornLogger(Logger):
    """gunicorn's own logger, with both of its loggers handed to loguru (no second format)."""

    def setup(self, cfg: Any) -> None:
        """Let gunicorn configure levels, then swap its stream handlers for loguru's."""
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.handlers = [InterceptHandler()]
            log.propagate = False  # handled here: the root logger must not print it again
