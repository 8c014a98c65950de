"""scripts/side_by_side.py's arithmetic and process accounting (the servers themselves are measured, not tested)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench
import side_by_side as sbs


def test_memory_counts_the_whole_process_tree():
    """Immich ML serves from a gunicorn worker two processes below the one started: its RSS must count."""
    child_code = "import time; x = b'x' * (200 << 20); time.sleep(60)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child_code!r}])"]
    )
    try:
        deadline = time.monotonic() + 30
        while len(bench.tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        [child] = bench.tree(parent.pid)[1:]
        while bench.rss_mb(child) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bench.rss_mb(parent.pid) >= bench.rss_mb(child) + 5 >= 205  # the child's 200 MB and the parent
    finally:
        parent.kill()
        parent.wait(10)


def test_ratios_are_per_round_then_the_median(monkeypatch):
    monkeypatch.setattr(sbs, "FIGURES", [("idle RSS", "MB", lambda r: r["idle_rss_mb"])])
    runs = {
        sbs.AIO: [{"idle_rss_mb": 100.0}, {"idle_rss_mb": 300.0}, {"idle_rss_mb": 90.0}],
        sbs.IML: [{"idle_rss_mb": 200.0}, {"idle_rss_mb": 300.0}, {"idle_rss_mb": 100.0}],
    }
    [row] = sbs.compare(runs)
    assert row["ratio"] == 0.9  # median of 0.5, 1.0, 0.9 — not 490 / 600
    table = sbs.markdown([row])
    assert "| idle RSS (MB) | 90–300 | 100–300 | **0.90** |" in table
