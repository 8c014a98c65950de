"""scripts/side_by_side.py's arithmetic and process accounting (the servers themselves are measured, not tested)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def mapping_child(tmp_path: Path, code: str) -> Iterator[int]:
    """A child that maps a 96 MB file (`sys.argv[1]`) as `code` says, prints "ready" and sleeps: its pid."""
    import select

    data = tmp_path / "weights.bin"
    data.write_bytes(b"\1" * (96 << 20))
    code = f"import mmap, sys, time; f = open(sys.argv[1], 'rb'); {code}; print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()
        child.wait(10)


def test_anonymous_memory_leaves_out_mapped_files(tmp_path):
    """immich-aio's packed weights are pages of a mapped file, which RSS counts and the kernel can drop; the
    anonymous part is what it cannot, so it must hold the heap and not the file's pages."""
    code = (
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); s = sum(m[i] for i in range(0, len(m), 4096)); "
        "heap = bytearray(64 << 20); heap[::4096] = b'x' * (16 << 10)"
    )
    with mapping_child(tmp_path, code) as pid:
        rss, anon = bench.rss_mb(pid), bench.anon_mb(pid)
        assert anon >= 64  # the heap, every page touched
        assert rss - anon >= 96  # the mapped file's pages are resident, but not anonymous


def test_pss_counts_a_file_mapped_twice_once(tmp_path):
    """Two sessions of one model map the same saved weights: RSS counts those pages once per mapping, PSS (and a
    container's memory) once."""
    code = (
        "ms = [mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) for _ in range(2)]; "
        "s = sum(m[i] for m in ms for i in range(0, len(m), 4096))"
    )
    with mapping_child(tmp_path, code) as pid:
        rss, pss = bench.rss_mb(pid), bench.pss_mb(pid)
        assert rss >= 2 * 96  # each mapping's pages counted
        assert 96 <= pss <= rss - 90  # the file once


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


def test_both_servers_first_requests_start_from_the_page_cache_state_named(tmp_path, monkeypatch):
    """Every file of the model folder, the optimised copies included, is dropped (after its written pages reach
    the disk) or read whole: without it immich-aio's copies and Immich ML's files met different states."""
    import os

    copy = tmp_path / ".ort-cache" / "a" / "b" / "packed" / "weights.bin"
    files = [tmp_path / "clip" / "m" / "visual" / "model.onnx", copy]
    for i, f in enumerate(files):
        f.parent.mkdir(parents=True)
        f.write_bytes(bytes(1000 * (i + 1)))
    calls: list[tuple[str, int]] = []
    names: dict[int, str] = {}
    real_open = os.open

    def opened(path, flags):
        fd = real_open(path, flags)
        names[fd] = str(path)  # numbers are reused once closed
        return fd

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(("sync", names[fd])))
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: calls.append((f"advise {o} {n} {a}", names[fd])))
    assert sbs.page_cache(tmp_path, "disk") == 3000
    dropped = f"advise 0 0 {os.POSIX_FADV_DONTNEED}"
    assert sorted(calls) == sorted([("sync", str(f)) for f in files] + [(dropped, str(f)) for f in files])
    assert [c[0] for c in calls if c[1] == str(files[1])] == ["sync", dropped]
    # then, when asked, it waits for the cache below this machine's to let the files go too (the project's VM read
    # them back at 1.6-2 GB/s 5 s after a drop, at 0.4-0.6 GB/s, as from its disk, after 20 s): after every drop
    calls.clear()
    monkeypatch.setattr(sbs.time, "sleep", lambda s: calls.append((f"sleep {s}", "")))
    assert sbs.page_cache(tmp_path, "disk", rest=7) == 3000
    assert calls[-1] == ("sleep 7", "") and len(calls) == 2 * len(files) + 1
    calls.clear()
    read: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: (b := real_read(fd, n), read.append(len(b)))[0])
    assert sbs.page_cache(tmp_path, "memory", rest=7) == 3000 and sum(read) == 3000 and not calls


def test_a_model_file_rewritten_in_place_or_replaced_is_seen(tmp_path):
    """Immich ML rewrites a face recogniser in place on its first load: the run must not measure across that."""
    model = tmp_path / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"x" * 100)
    cached = tmp_path / ".ort-cache" / "a" / "b" / "model.onnx"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"y")
    before = sbs.model_files(tmp_path)
    assert list(before) == [model]  # the optimised copies are the server's own, not the shared files
    cached.write_bytes(b"yy")
    assert sbs.model_files(tmp_path) == before
    time.sleep(0.01)
    model.write_bytes(b"z" * 100)  # same size, rewritten
    assert sbs.model_files(tmp_path) != before


def test_the_two_servers_answers_are_compared_task_by_task():
    def answers(scale: float = 1.0, extra_face: bool = False, lines: tuple[str, ...] = ("发票", "合计 19.30元")):
        face = {"box": [1.0, 2.0, 30.0, 40.0], "embedding": [3.0 * scale, 4.0], "score": 0.9}
        return {
            "clip": [[0.6, 0.8 * scale]],
            "search": [[1.0, 0.0]],
            "face": [[face, face] if extra_face else [face]],
            "ocr": [{"text": list(lines), "box": [0.1 * scale] * 8 * len(lines)}],
        }

    same = sbs.agreement(answers(), answers())
    assert same["clip"] == "cosine ≥ 1.0000000, largest difference 0.0e+00"
    assert same["faces"].startswith("1 alike, boxes within 0 px")
    assert same["ocr"] == "2 of 2 lines read alike, in the same order, their boxes within 0.0 % of the image"

    moved = sbs.agreement(answers(), answers(scale=1.001, lines=("合计 19.30元", "发票")))
    assert "largest difference 8.0e-04" in moved["clip"] and "1.0000000" not in moved["clip"]
    assert "largest difference 3.0e-03" in moved["faces"]
    assert moved["ocr"] == "2 of 2 lines read alike, in another order, their boxes within 0.0 % of the image"
    assert sbs.agreement(answers(), answers(scale=1.5))["ocr"].endswith("within 5.0 % of the image")
    assert sbs.agreement(answers(), answers(lines=("发票", "合计19.30元")))["ocr"].startswith("1 of 2 lines")
    assert sbs.agreement(answers(), answers(extra_face=True))["faces"] == (
        "different faces found: [1] against [2] per photo"
    )
    assert "faces: 1 alike" in sbs.agreement_line(same)


BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_cpu_time_counts_the_tree_and_the_children_it_has_reaped():
    """A gunicorn worker serves Immich ML's requests, and immich-aio's ort_pack children come and go: the CPU time of
    a phase is the whole tree's, a child that has finished included."""
    parent_code = (
        "import subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.6)!r}])\n"  # finished and reaped: the parent's cutime
        f"child = subprocess.Popen([sys.executable, '-c', {(BURN.format(s=0.6) + 'time.sleep(60)')!r}])\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        [child] = bench.tree(parent.pid)[1:]
        while time.monotonic() < deadline and bench.cpu_seconds(child) < 0.6:
            time.sleep(0.05)
        assert bench.cpu_seconds(child) >= 0.6  # the running child, on its own
        assert bench.cpu_seconds(parent.pid) >= bench.cpu_seconds(child) + 0.55  # and the reaped one, in the total
    finally:
        parent.kill()
        parent.wait(10)


def test_the_mix_cpu_split_weighs_throughput_by_cost():
    run = {
        "mix": {"clip": {"throughput": 2.0}, "face": {"throughput": 1.0}, "ocr": {"throughput": 1.0}},
        "alone": {"clip": {"cpu_ms": 400.0}, "face": {"cpu_ms": 800.0}, "ocr": {"cpu_ms": 400.0}},
        "mix_cores": 1.9,
    }
    assert sbs.cpu_split(run) == {"clip": 0.4, "face": 0.4, "ocr": 0.2}
    line = sbs.split_line({sbs.AIO: [run], sbs.IML: [run | {"mix_cores": 1.5}]})
    assert "immich-aio 1.90 cores busy, clip 40 % / face 40 % / ocr 20 %; Immich ML 1.50 cores busy" in line


@contextlib.contextmanager
def fake_ml(delay: dict[str, float], workers: dict[str, int]) -> Iterator[tuple[str, dict]]:
    """A stand-in /predict on 127.0.0.1 that takes `delay[task]` s per request and records, per task, each photo
    it was sent and the most requests in flight at once. The first request of a task waits (10 s at most) until
    `workers[task]` are in flight, so a queue that runs its workers one after another is seen, not raced."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: dict = {"photos": {}, "peak": {}, "searches": 0}
    lock, flying, arrived = threading.Lock(), {t: 0 for t in workers}, {t: threading.Event() for t in workers}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if not self.headers["Content-Type"].startswith("multipart/"):
                task = "search"  # a text, sent urlencoded
            else:
                entries = json.loads(body.split(b'name="entries"\r\n\r\n', 1)[1].split(b"\r\n", 1)[0])
                task = {"clip": "clip", "facial-recognition": "face", "ocr": "ocr"}[next(iter(entries))]
            if task == "search":
                with lock:
                    seen["searches"] += 1
            else:
                photo = body.split(b'filename="blob"', 1)[1].split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
                with lock:
                    seen["photos"].setdefault(task, []).append(photo)
                    flying[task] += 1
                    first = len(seen["photos"][task]) == 1
                    seen["peak"][task] = max(seen["peak"].get(task, 0), flying[task])
                    if flying[task] >= workers[task]:
                        arrived[task].set()
                if first:
                    arrived[task].wait(10)
                time.sleep(delay[task])
                with lock:
                    flying[task] -= 1
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_library_takes_each_photo_once_per_queue_with_that_queues_workers():
    """Immich runs one job per photo and task, each queue with its own concurrency (2 CLIP, 2 face, 1 OCR)."""
    queues = {"clip": 2, "face": 2, "ocr": 1}
    photos = [b"photo-a", b"photo-b", b"photo-c"]
    with fake_ml({"clip": 0.01, "face": 0.03, "ocr": 0.01}, queues) as (base, seen):
        load = bench.Load(base, photos, sbs.SIDE_ENTRIES)
        done = load.library(list(queues.items()), photos=7, seconds=120, search_every=0.02)
    for task, workers in queues.items():
        assert sorted(seen["photos"][task]) == sorted(photos[i % 3] for i in range(7))  # each of the 7 once
        assert seen["peak"][task] == workers
        assert load.done[task] == 7 and not load.errors[task]
        assert 0 < done[task] <= done["all"]
    assert done["all"] == max(done[t] for t in queues)
    assert seen["searches"] >= 1 and load.done["search"] == seen["searches"] and not load.errors["search"]


def test_a_library_stops_at_its_deadline_and_says_which_queues_were_not_done():
    with fake_ml({"clip": 0.0, "face": 0.2, "ocr": 0.0}, {"clip": 1, "face": 1, "ocr": 1}) as (base, seen):
        load = bench.Load(base, [b"x"], sbs.SIDE_ENTRIES)
        started = time.monotonic()
        done = load.library([("clip", 1), ("face", 1), ("ocr", 1)], photos=100, seconds=1.0)
        assert time.monotonic() - started < 30  # each worker stopped by itself, not after its 100 photos
    assert done["clip"] > 0 and done["ocr"] > 0  # quick queues finished
    assert done["face"] != done["face"] and done["all"] != done["all"]  # NaN: not done by the deadline
    assert len(seen["photos"]["face"]) < 100
    assert not any(load.errors.values())
