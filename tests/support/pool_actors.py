"""Ray actors for tests/core/test_worker_pool.py: here, on the workers' PYTHONPATH, so Ray can import them there."""

from __future__ import annotations

import os
import time


class Counter:
    """Accumulates the items it is given until `state` hands them over; dies once where a marker file says."""

    def __init__(self, marker: str, die_at: str):
        self.items: list[int] = []
        self.marker, self.die_at = marker, die_at

    def _die_once(self) -> None:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)  # the process ends as a SIGKILL would end it: no cleanup, no answer

    def add(self, item: int) -> int:
        if self.die_at == "map" and item == 17:
            self._die_once()
        self.items.append(item)
        return item

    def state(self) -> list[int]:
        if self.die_at == "gather" and self.items:
            self._die_once()
        items, self.items = self.items, []
        return items

    def hang(self, _item: int) -> None:
        time.sleep(3600)
