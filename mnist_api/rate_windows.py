"""The RATE_LIMIT grammar: `120/minute`, `10 per second`, `1000/2 hours`, joined by `;`."""

from __future__ import annotations

import re
from dataclasses import dataclass

SECONDS_PER_UNIT = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_ONE = re.compile(
    r"^\s*(?P<amount>\d+)\s*(?:/|per)\s*(?P<multiple>\d+)?\s*"
    r"(?P<unit>second|minute|hour|day)s?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Window:
    """At most `amount` requests per fixed window of `seconds`."""

    amount: int
    seconds: int

    @property
    def name(self) -> str:
        """A stable name for the window, part of its counter's key (`120/60s`)."""
        return f"{self.amount}/{self.seconds}s"


def parse_windows(text: str) -> tuple[Window, ...]:
    """Every limit in `text` (`;` or `,` between limits); ValueError if one is not a limit."""
    windows = []
    for part in re.split(r"[;,]", text):
        if not part.strip():
            continue
        match = _ONE.match(part)
        if match is None or int(match["amount"]) < 1:
            raise ValueError(f"not a rate limit: {part.strip()!r}")
        multiple = int(match["multiple"] or 1)
        unit = SECONDS_PER_UNIT[match["unit"].lower()]
        windows.append(Window(int(match["amount"]), max(1, multiple) * unit))
    if not windows:
        raise ValueError("no rate limit given")
    return tuple(windows)
