"""Admitting requests by what they cost, not by how many are waiting.

The Immich server drops a job that gets a non-2xx and never retries it, so "busy" must mean the machine
really cannot hold more, never that others are waiting. A waiting request is cheap here: its upload is
spooled (memory up to 1 MB, the rest on disk), its image is decoded only within the shared pixel budget
when its turn comes, and a body still arriving holds no thread and no inference slot. So a request is
refused only when

- the memory left (MemAvailable, or the container's cgroup limit if lower) is under the reserve plus what
  one more queued request can hold in memory, or
- the disk the uploads spool to has less free space than the reserve plus the largest upload,

and IMMICH_AIO_MAX_QUEUED, when set above 0, adds an operator's cap on the count. Each refusal says which.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from immich_aio.errors import ServiceUnavailable
from immich_aio.http_form import FIELD_SLACK

SPOOL_IN_MEMORY = 1024 * 1024  # Starlette keeps this much of each upload in memory before spilling to disk
PER_REQUEST_MEMORY = SPOOL_IN_MEMORY + FIELD_SLACK
SAMPLE_S = 0.2  # the figures are re-read at most this often


def available_memory() -> int | None:
    """Bytes that can still be allocated: MemAvailable, lowered to the cgroup (v2 or v1) limit's headroom."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            headroom = int(limit) - usage
            available = headroom if available is None else min(available, headroom)
        break
    return available


class Admission:
    def __init__(
        self,
        max_upload_bytes: int,
        memory_reserve: int,
        disk_reserve: int,
        max_count: int = 0,
        spool_dir: str | None = None,
    ) -> None:
        self.max_upload_bytes = max_upload_bytes
        self.memory_reserve = memory_reserve
        self.disk_reserve = disk_reserve
        self.max_count = max_count
        self.spool_dir = spool_dir or tempfile.gettempdir()
        self._lock = threading.Lock()
        self._sampled_at = -1.0
        self._memory: int | None = None
        self._disk: int | None = None

    def _sample(self) -> tuple[int | None, int | None]:
        now = time.monotonic()
        with self._lock:
            if now - self._sampled_at >= SAMPLE_S:
                self._memory = available_memory()
                try:
                    self._disk = shutil.disk_usage(self.spool_dir).free
                except OSError:
                    self._disk = None
                self._sampled_at = now
            return self._memory, self._disk

    def check(self, in_flight: int) -> None:
        """Raise a 503 saying why when one more request cannot be held; otherwise return."""
        if self.max_count and in_flight >= self.max_count:
            raise ServiceUnavailable(
                f"Busy: {in_flight} requests are already admitted (IMMICH_AIO_MAX_QUEUED={self.max_count}); "
                "try again later"
            )
        memory, disk = self._sample()
        if memory is not None and memory < self.memory_reserve + PER_REQUEST_MEMORY:
            raise ServiceUnavailable(
                f"Busy: only {memory / 2**20:.0f} MB of memory left, under the {self.memory_reserve / 2**20:.0f} MB "
                f"kept free (IMMICH_AIO_MEMORY_RESERVE_MB) with {in_flight} requests in flight; try again later"
            )
        if disk is not None and disk < self.disk_reserve + self.max_upload_bytes:
            raise ServiceUnavailable(
                f"Busy: only {disk / 2**20:.0f} MB free in {self.spool_dir}, where uploads are spooled; that is under "
                f"the {self.disk_reserve / 2**20:.0f} MB kept free plus one upload of up to "
                f"{self.max_upload_bytes / 2**20:.0f} MB (IMMICH_AIO_MAX_UPLOAD_MB); free some disk or set TMPDIR"
            )

    def describe(self) -> dict[str, object]:
        memory, disk = self._sample()
        return {
            "memoryAvailableBytes": memory,
            "memoryReserveBytes": self.memory_reserve,
            "spoolDir": self.spool_dir,
            "spoolFreeBytes": disk,
            "diskReserveBytes": self.disk_reserve,
            "maxQueued": self.max_count or None,
        }
