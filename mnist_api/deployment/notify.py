"""Change notifications through Redis pub/sub: optional, and never the truth.

The deployment lives in the database and every worker re-reads it every
`DEPLOYMENT_REFRESH_SECONDS`. With `REDIS_URL`, the process that writes a change also
publishes its id on `mnist:deployment:changed`, and every worker that listens re-reads the
database at once instead of at its next tick. A lost message, a flushed or a dead Redis
only means the change arrives at the next tick, as it does without Redis: nothing is ever
read from Redis but "look now".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
from loguru import logger

from mnist_api import redis_clients

CHANNEL = "mnist:deployment:changed"
# Publishing happens inside an admin's request: give up quickly when Redis is slow.
_PUBLISH = redis_clients.Role("deployment-notify", socket_timeout=0.5, connect_timeout=0.5)
# The listener blocks on its socket for a message; a timeout just loops.
_LISTEN = redis_clients.Role("deployment-listen", socket_timeout=5.0, connect_timeout=1.0)
_RETRY_SECONDS = 5.0


class ChangeNotifier:
    """Publishes deployment changes and wakes a worker's refresh when one arrives."""

    def __init__(self, url: str) -> None:
        self.url = url

    def publish(self, deployment_id: str) -> None:
        """Tell every listening worker that `deployment_id` is in force; best effort."""
        try:
            redis_clients.client(self.url, _PUBLISH).publish(CHANNEL, deployment_id)
        except redis.RedisError as error:
            logger.debug("deployment change not published: {}", type(error).__name__)

    def listen(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """Call `wake` for each change published, until `stop` is set (a daemon thread's
        body); reconnects after a Redis failure."""
        while not stop.is_set():
            client = redis_clients.client(self.url, _LISTEN)
            pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(CHANNEL)
                while not stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        wake()
            except (redis.RedisError, OSError) as error:
                logger.debug("deployment notifications paused: {}", type(error).__name__)
                stop.wait(_RETRY_SECONDS)
            finally:
                pubsub.close()
