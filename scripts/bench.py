"""Benchmark immich-aio against the physical limit: the same ONNX models run directly by ONNX Runtime.

    python scripts/bench.py                       # starts a server on 127.0.0.1, ~7 minutes
    python scripts/bench.py --duration 600        # the 10-minute run behind the README's table
    python scripts/bench.py --url http://127.0.0.1:3003 --store ./models --json

Phases, all in one run, with the server's RSS sampled four times a second throughout:
 1. raw ONNX Runtime on prepared tensors (all cores, no HTTP, no decode): throughput, and the latency
    of one image's runs;
 2. idle: the server with every model loaded and nothing to do;
 3. one request at a time per task: a request's latency, against raw ONNX Runtime's for the same image;
 4. idle search latency (text queries, nothing else running);
 5. each image task alone at 8 concurrent requests -> efficiency = server throughput / raw;
 6. Immich's mix for --duration seconds: 2 CLIP-visual + 2 face + 1 OCR concurrent streams of
    1440-px JPEG previews, plus a person searching every 2 s; per-task throughput, p50/p95/p99,
    errors, and RSS (peak, and first vs last quarter);
 7. idle again after the mix: what the server gives back;
 8. raw ONNX Runtime again, the server stopped: every ratio divides by the mean of 1 and 8, because
    this machine's speed drifts by 10 % and more within minutes (the drift is reported).
Against Immich ML itself, measured side by side on the same files: scripts/side_by_side.py.
Only 127.0.0.1 is targeted; every loop stops by itself at its deadline.
Needs the test dependencies (`bash scripts/test.sh` installs them) to create stand-in models.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CLIP_NAME = "ViT-B-32__openai"
OCR_NAME = "PP-OCRv5_mobile"  # Immich's default; --ocr-model picks another
FACE_NAME = "buffalo_l"
ENTRIES = {
    "clip": {"clip": {"visual": {"modelName": CLIP_NAME}}},
    "face": {
        "facial-recognition": {
            "detection": {"modelName": FACE_NAME, "options": {"minScore": 0.7}},
            "recognition": {"modelName": FACE_NAME},
        }
    },
    "ocr": {
        "ocr": {
            "detection": {"modelName": OCR_NAME, "options": {"minScore": 0.5, "maxResolution": 736}},
            "recognition": {"modelName": OCR_NAME, "options": {"minScore": 0.8}},
        }
    },
    "search": {"clip": {"textual": {"modelName": CLIP_NAME, "options": {"language": "zh-CN"}}}},
}
QUERIES = ["海边的日落", "发票", "一只猫在沙发上睡觉", "sunset at the beach", "生日蛋糕", "雪山 徒步", "地铁站"]


def previews() -> list[bytes]:
    """1440-px JPEG previews (quality 80, as Immich makes them) from images shipped in wheels and fixtures."""
    import skimage

    sources = [Image.open(p) for p in sorted((ROOT / "tests" / "fixtures" / "ocr").glob("*.jpg"))]
    data = Path(skimage.__file__).parent / "data"
    sources += [Image.open(data / n) for n in ("astronaut.png", "coffee.png", "chelsea.png")]
    group = ROOT / "tests" / ".vendor" / "insightface" / "data" / "images" / "t1.jpg"
    if group.exists():
        sources.append(Image.open(group))
    out = []
    for img in sources:
        img = img.convert("RGB")
        scale = 1440 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# --- raw ONNX Runtime ---------------------------------------------------------------------------


def raw_throughput(
    store: Path, images: list[bytes], seconds: float, providers: list | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Each task's models run directly by ONNX Runtime on prepared tensors: items per second, and the mean
    milliseconds of one image's runs (one text's, for search). `providers`: ONNX Runtime's, CPU by default
    (scripts/gpu_check.py passes CUDA's)."""
    import onnxruntime as ort

    from immich_aio.config import Settings
    from immich_aio.imaging import decode_image
    from immich_aio.runtime import build_resolvers
    from immich_aio.sessions import SessionFactory
    from immich_aio.store import ModelStore

    opts = ort.SessionOptions()  # ORT's own defaults: every core for one run
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])

    def rate(fn, items_per_call: float) -> float:
        fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n * items_per_call / (time.perf_counter() - start)

    def one_at_a_time_ms(calls: list) -> float:
        """Mean time of one call, cycling through the calls (one per image) for about `seconds`."""
        calls[0]()
        total, n, start = 0.0, 0, time.perf_counter()
        while n < len(calls) or time.perf_counter() - start < seconds:
            fn = calls[n % len(calls)]
            t = time.perf_counter()
            fn()
            total += time.perf_counter() - t
            n += 1
        return 1000 * total / n

    settings = Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(store)})
    factory = SessionFactory(settings)
    resolvers = build_resolvers(settings, ModelStore(store), factory)
    arrays = [decode_image(b, 10**9) for b in images]
    out: dict[str, float] = {}
    single: dict[str, float] = {}

    visual = resolvers["clip"].resolve("visual", CLIP_NAME).build()
    visual.load()
    x = np.stack([visual.prepare(a)[0] for a in arrays[:8]])
    s = session(visual.files["model"])
    name = s.get_inputs()[0].name
    out["clip"] = max(rate(lambda: s.run(None, {name: x[:1]}), 1), rate(lambda: s.run(None, {name: x}), len(x)))
    single["clip"] = one_at_a_time_ms([lambda i=i: s.run(None, {name: x[i : i + 1]}) for i in range(len(x))])
    visual.close()

    textual = resolvers["clip"].resolve("textual", CLIP_NAME).build()
    textual.load()
    ids = textual.prepare(QUERIES[0])[0][None]
    s = session(textual.files["model"])
    out["search"] = rate(lambda: s.run(None, {s.get_inputs()[0].name: ids}), 1)
    single["search"] = 1000 / out["search"]
    textual.close()

    # faces: detector on every image + recogniser on the faces found, per image
    det = resolvers["facial-recognition"].resolve("detection", FACE_NAME).build()
    rec = resolvers["facial-recognition"].resolve("recognition", FACE_NAME).build()
    det.load()
    rec.load()
    from immich_aio.models.faces import align, letterbox

    det_blobs, crops = [], []
    for a in arrays:
        canvas, _ = letterbox(a)
        det_blobs.append(((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None])
        found = det.detect(a, 0.7)
        crops.append(np.stack([align(a, m) for m in found.landmarks]) if len(found.boxes) else None)
    sd, sr = session(det.files["model"]), session(rec.files["model"])
    dname, rname = sd.get_inputs()[0].name, sr.get_inputs()[0].name

    def face_image(blob, c):
        sd.run(None, {dname: blob})
        if c is not None:
            sr.run(None, {rname: ((c.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)})

    def face_pass():
        for blob, c in zip(det_blobs, crops, strict=True):
            face_image(blob, c)

    out["face"] = rate(face_pass, len(arrays))
    single["face"] = one_at_a_time_ms(
        [lambda b=b, c=c: face_image(b, c) for b, c in zip(det_blobs, crops, strict=True)]
    )
    out["faces_per_image"] = sum(len(c) for c in crops if c is not None) / len(arrays)
    det.close()
    rec.close()

    # OCR: detector at its input size + recogniser on each image's lines
    odet, orec = ocr_models(resolvers)
    jobs = ocr_inputs(odet, orec, arrays)
    so, sl = session(odet.files["model"]), session(orec.files["model"])

    def ocr_image(blob, lines):
        so.run(None, {"x": blob})
        for width in sorted({ln.shape[2] for ln in lines}):
            group = [ln for ln in lines if ln.shape[2] == width]
            sl.run(None, {"x": np.stack(group)})

    def ocr_pass():
        for blob, lines in jobs:
            ocr_image(blob, lines)

    out["ocr"] = rate(ocr_pass, len(arrays))
    single["ocr"] = one_at_a_time_ms([lambda b=b, ln=ln: ocr_image(b, ln) for b, ln in jobs])
    odet.close()
    orec.close()
    return out, single


def ocr_models(resolvers: dict) -> tuple:
    """The benchmark's OCR detector and recogniser (ENTRIES), loaded by the server's own resolvers."""
    odet = resolvers["ocr"].resolve("detection", ENTRIES["ocr"]["ocr"]["detection"]["modelName"]).build()
    orec = resolvers["ocr"].resolve("recognition", ENTRIES["ocr"]["ocr"]["recognition"]["modelName"]).build()
    odet.load()
    orec.load()
    return odet, orec


def ocr_inputs(odet, orec, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per image (RGB), the loaded OCR detector's input at its run size and the recogniser's line tensors, made as
    the server makes them, with Immich's default options."""
    import cv2

    from immich_aio.jobs import Job
    from immich_aio.models.ocr import crop_quad, detector_blob, detector_input_size
    from immich_aio.payload import Payload

    out = []
    for a in arrays:
        h, w = detector_input_size(*a.shape[:2], 736, 2560)
        bgr = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
        blob = detector_blob(np.ascontiguousarray(cv2.resize(bgr, (w, h)).transpose(2, 0, 1)))
        found = odet.predict(Payload(Job(), image=a), {"minScore": 0.5, "maxResolution": 736})
        out.append((blob, [orec.prepare_line(c) for q in found.quads if (c := crop_quad(bgr, q)) is not None]))
    return out


# --- server and load ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allocator_in(pid: int | None) -> str:
    """The malloc the server runs on, from the libraries mapped into it."""
    from immich_aio import memory

    return "unknown (--url)" if pid is None else memory.allocator_in(pid)


@contextmanager
def server(store: Path, url: str | None, extra_env: dict[str, str] | None = None):
    if url:
        yield url.rstrip("/"), None
        return
    port = free_port()
    env = dict(
        os.environ,
        IMMICH_HOST="127.0.0.1",
        IMMICH_PORT=str(port),
        MACHINE_LEARNING_CACHE_FOLDER=str(store),
        IMMICH_LOG_LEVEL="warn",
        MACHINE_LEARNING_MODEL_TTL="0",
    )
    env.update(extra_env or {})
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "immich_aio"], cwd=ROOT, env=env, stdout=log, stderr=log)
        yield from _serve(proc, log, f"http://127.0.0.1:{port}")


def wait_until_up(base: str, proc: subprocess.Popen, log, what: str = "server", seconds: float = 120) -> None:
    """Until /ping answers; if the server exits or the deadline passes, raises with the end of its log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/ping", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    log.seek(0)
    raise RuntimeError(f"{what} did not start:\n" + log.read().decode(errors="replace")[-3000:])


def _serve(proc: subprocess.Popen, log, base: str):
    try:
        wait_until_up(base, proc, log)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def tree(pid: int) -> list[int]:
    """The process and all its descendants (a server that forks workers, as gunicorn does)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:  # exited meanwhile
            continue
    return out


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) the process tree has used so far, in seconds; children it has reaped included (an
    ort_pack child of immich-aio's, gunicorn's first worker), so the difference over a phase is that phase's work."""
    if pid is None:
        return float("nan")
    ticks = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            if p == pid:
                raise
            continue
        ticks += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


SMAPS_FIELDS = {"Pss"}  # read from /proc/<pid>/smaps_rollup; every other field from /proc/<pid>/status


def _tree_mb(pid: int | None, *fields: str) -> tuple[float, ...]:
    """/proc/<pid>/status (and smaps_rollup) fields (kB) summed over the process tree, in MB: one walk, each file read
    once, so the figures are of one moment."""
    if pid is None:
        return tuple(float("nan") for _ in fields)
    totals = dict.fromkeys(fields, 0)
    files = [f for f, wanted in (("status", set(fields) - SMAPS_FIELDS), ("smaps_rollup", SMAPS_FIELDS & set(fields)))
             if wanted]  # fmt: skip
    for p in tree(pid):
        try:
            for name in files:
                with open(f"/proc/{p}/{name}") as f:
                    for ln in f:
                        key = ln.split(":", 1)[0]
                        if key in totals:
                            totals[key] += int(ln.split()[1])
        except OSError:
            if p == pid:
                raise
    return tuple(totals[k] / 1024 for k in fields)


def pss_mb(pid: int | None) -> float:
    """Proportional set size of the whole process tree, MB: each resident page divided among the mappings that
    share it. RSS counts a page once per mapping: immich-aio's two sessions of one model (IMMICH_AIO_SPLIT_RUNS)
    map the same saved weights, so RSS counts those pages twice though they are in memory once, as PSS and a
    container's memory count them (so do Immich ML's gunicorn processes' shared pages)."""
    return _tree_mb(pid, "Pss")[0]


def rss_mb(pid: int | None) -> float:
    """Resident memory of the whole process tree, MB (what a container's memory holds, shared pages counted once
    per process: for a single-process server it is the process's RSS)."""
    return _tree_mb(pid, "VmRSS")[0]


def anon_mb(pid: int | None) -> float:
    """The anonymous part of that resident memory, MB: heap and the like, which the kernel can only swap out.

    The rest of RSS is pages of mapped files (libraries, and model weights mapped from a file, as immich-aio's
    packed copies are): clean page-cache pages the kernel drops under memory pressure and reads again when used.
    """
    return _tree_mb(pid, "RssAnon")[0]


class RssMonitor:
    """Samples a process's RSS four times a second, filed under the phase running at the time."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.phase = "start"
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.anon: dict[str, list[float]] = defaultdict(list)  # anon_mb, sampled with each RSS sample
        self.pss: dict[str, list[float]] = defaultdict(list)  # pss_mb, likewise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssMonitor:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            phase = self.phase
            try:
                rss, anon, pss = _tree_mb(self.pid, "VmRSS", "RssAnon", "Pss")  # one walk: figures of one moment
            except OSError:  # the server has exited
                return
            self.samples[phase].append(rss)
            self.anon[phase].append(anon)
            self.pss[phase].append(pss)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            phase: {"peak": max(v), "mean": statistics.mean(v), "last": v[-1]} for phase, v in self.samples.items() if v
        }


def form(entries: dict, task: str, image: bytes, text: str) -> tuple[dict, dict | None]:
    """The /predict form for one task: the text for a search, the image otherwise."""
    if task == "search":
        return {"entries": json.dumps(entries), "text": text}, None
    return {"entries": json.dumps(entries)}, {"image": ("blob", image, "application/octet-stream")}


class Load:
    """Closed-loop streams against one server; each stream stops by itself at the deadline."""

    def __init__(self, base: str, images: list[bytes], entries: dict | None = None) -> None:
        self.base, self.images = base, images
        self.entries = entries or ENTRIES
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.done: dict[str, int] = defaultdict(int)
        self.seconds = self.elapsed = 0.0
        self.lock = threading.Lock()

    def one(self, client: httpx.Client, task: str, i: int) -> None:
        data, files = form(self.entries[task], task, self.images[i % len(self.images)], QUERIES[i % len(QUERIES)])
        start = time.perf_counter()
        try:
            ok = client.post(self.base + "/predict", data=data, files=files, timeout=300).status_code == 200
        except httpx.HTTPError:
            ok = False
        elapsed = time.perf_counter() - start
        with self.lock:
            if ok:
                self.latency[task].append(elapsed)
                self.done[task] += 1
            else:
                self.errors[task] += 1

    def stream(
        self, task: str, deadline: float, offset: int, every: float = 0.0, stop: threading.Event | None = None
    ) -> None:
        """Requests of one task until the deadline (or `stop`), back to back or one every `every` s, paced from each
        request's start: waiting `every` after each answer would leave the connection idle exactly as long as a
        server may keep it alive (2 s), and now and then a request would meet it closing."""
        stop = stop or threading.Event()
        with httpx.Client() as client:
            i = offset
            while time.monotonic() < deadline and not stop.is_set():
                started = time.monotonic()
                self.one(client, task, i)
                i += 1
                if every:
                    stop.wait(max(0.0, every - (time.monotonic() - started)))

    def run(self, plan: list[tuple[str, float]], seconds: float, pid: int | None = None) -> list[float]:
        """plan: (task, period; 0 = back to back) per stream. Returns RSS samples (MB, 1 per second)."""
        started = time.monotonic()
        deadline = started + seconds
        threads = [
            threading.Thread(target=self.stream, args=(t, deadline, k * 3, every)) for k, (t, every) in enumerate(plan)
        ]
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads):
            samples.append(rss_mb(pid))
            time.sleep(1.0)
        for t in threads:
            t.join()
        self.seconds = seconds
        self.elapsed = time.monotonic() - started  # the deadline, and the last requests finishing after it
        return samples

    def library(self, queues: list[tuple[str, int]], photos: int, seconds: float, search_every: float = 0.0) -> dict:
        """One library through Immich's queues: per (task, workers) the same `photos` photos, each taken once by
        the first free worker of that queue, all queues at once, and a search every `search_every` s (0: none)
        until the last queue is done. Returns the seconds until each queue was done (NaN: not by the deadline,
        `seconds`, at which every worker stops by itself) and until all were.

        Unlike the closed-loop mix, a queue that is done frees the CPU for the others, as a library's import
        does: how the server shares the cores between tasks moves when each finishes, not the work to do."""
        started = time.monotonic()
        deadline = started + seconds
        finished: dict[str, float] = {}
        everything = threading.Event()

        def worker(task: str, todo: Iterator[int], lock: threading.Lock) -> None:
            with httpx.Client() as client:
                while time.monotonic() < deadline:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    self.one(client, task, i)

        def queue(task: str, workers: int) -> None:
            todo, lock = iter(range(photos)), threading.Lock()
            threads = [threading.Thread(target=worker, args=(task, todo, lock)) for _ in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if self.done[task] + self.errors[task] >= photos:
                finished[task] = time.monotonic() - started

        helpers = [threading.Thread(target=queue, args=q) for q in queues]
        if search_every:
            helpers.append(threading.Thread(target=self.stream, args=("search", deadline, 0, search_every, everything)))
        for t in helpers:
            t.start()
        for t in helpers[: len(queues)]:
            t.join()
        everything.set()
        for t in helpers[len(queues) :]:
            t.join()
        self.elapsed = self.seconds = time.monotonic() - started
        done = {task: finished.get(task, float("nan")) for task, _ in queues}
        return done | {"all": max(done.values()) if len(finished) == len(queues) else float("nan")}

    def mean_ms(self, task: str) -> float:
        lat = self.latency[task]
        return 1000 * statistics.mean(lat) if lat else float("nan")

    def summary(self, task: str) -> dict[str, float]:
        lat = self.latency[task]
        return {
            "throughput": self.done[task] / self.seconds,
            "p50_ms": 1000 * percentile(lat, 50),
            "p95_ms": 1000 * percentile(lat, 95),
            "p99_ms": 1000 * percentile(lat, 99),
            "errors": self.errors[task],
            "requests": self.done[task],
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="benchmark a running server (127.0.0.1 only) instead of starting one")
    ap.add_argument("--store", type=Path, help="model store (default: a work folder with stand-in models)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--duration", type=float, default=60, help="seconds of the mixed phase")
    ap.add_argument("--solo", type=float, default=20, help="seconds of each single-task phase")
    ap.add_argument("--raw", type=float, default=5, help="seconds per raw ONNX Runtime measurement")
    ap.add_argument("--single", type=float, default=15, help="seconds of one-at-a-time requests per task")
    ap.add_argument("--idle", type=float, default=10, help="seconds of each idle phase")
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set for the server only, e.g. LD_PRELOAD=... or IMMICH_AIO_DECODE_BUDGET_MP=8 (repeatable)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--ocr-model", default=OCR_NAME, help="the OCR name requested (default: Immich's default)")
    args = ap.parse_args()
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        ap.error("--url must be a server on this machine (127.0.0.1 / localhost)")
    for type_ in ("detection", "recognition"):
        ENTRIES["ocr"]["ocr"][type_]["modelName"] = args.ocr_model
    store = args.store or args.work_dir / "models"
    made = {}
    if args.store is None:
        from bench_models import ensure

        made = ensure(store)
    images = previews()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    say("1/8 raw ONNX Runtime: throughput and one image's runs")
    raw_before, single_before = raw_throughput(store, images, args.raw)
    models = (
        f"--store {store}" if args.store else f"stand-ins in {store} ({', '.join(made.values()) or 'already there'})"
    )
    results: dict[str, object] = {
        "cores": os.cpu_count(),
        "models": models,
        "ocr_model": args.ocr_model,
    }
    extra_env = dict(kv.split("=", 1) for kv in args.server_env)
    with server(store, args.url, extra_env) as (base, pid), RssMonitor(pid) as rss:
        time.sleep(2)
        rss.phase = "started"
        time.sleep(2)
        rss.phase = "warm-up"
        warm = Load(base, images)
        warm.run([("clip", 0), ("face", 0), ("ocr", 0), ("search", 0)], 1)  # load every model once
        say("2/8 idle, every model loaded")
        rss.phase = "idle"
        time.sleep(args.idle)
        single = {}
        for task in ("clip", "face", "ocr", "search"):
            say(f"3/8 {task}: one request at a time")
            rss.phase = "one at a time"
            load = Load(base, images)
            load.run([(task, 0)], args.single)
            single[task] = load.summary(task) | {"mean_ms": load.mean_ms(task)}
        say("4/8 idle search latency")
        rss.phase = "idle search"
        idle = Load(base, images)
        idle.run([("search", 0.2)], 8)
        results["search_idle"] = idle.summary("search")
        solo = {}
        for task in ("clip", "face", "ocr"):
            say(f"5/8 {task} alone, 8 concurrent requests")
            rss.phase = "alone, 8 concurrent"
            load = Load(base, images)
            load.run([(task, 0)] * 8, args.solo)
            solo[task] = load.summary(task)
        say(f"6/8 Immich mix for {args.duration:.0f} s")
        rss.phase = "mix"
        mix = Load(base, images)
        mix.run([("clip", 0), ("clip", 0), ("face", 0), ("face", 0), ("ocr", 0), ("search", 2.0)], args.duration)
        results["allocator"] = allocator_in(pid)
        say("7/8 idle after the mix")
        rss.phase = "idle after"
        time.sleep(args.idle)
        mix_rss = rss.samples.get("mix", [])
        quarter = max(1, len(mix_rss) // 4)
        tasks = {t: mix.summary(t) for t in ("clip", "face", "ocr", "search")}
        results["rss_mb"] = (
            {
                "phases": rss.summary(),
                "peak": max(mix_rss),
                "first_quarter": statistics.mean(mix_rss[:quarter]),
                "last_quarter": statistics.mean(mix_rss[-quarter:]),
            }
            if pid and mix_rss
            else None
        )
    # Raw ONNX Runtime again, the server stopped: this machine's speed drifts by 10 % and more over minutes,
    # so the ratios below divide by the mean of the measurements before and after the server's phases.
    say("8/8 raw ONNX Runtime again")
    raw_after, single_after = raw_throughput(store, images, args.raw)
    raw = {k: (raw_before[k] + raw_after[k]) / 2 for k in raw_before}
    raw_single = {k: (single_before[k] + single_after[k]) / 2 for k in single_before}
    results["raw_per_s"] = raw
    results["raw_one_image_ms"] = raw_single
    results["raw_drift"] = {k: raw_after[k] / raw_before[k] for k in ("clip", "face", "ocr", "search")}
    for task, s in single.items():
        s["raw_ms"] = raw_single[task]
        s["raw_share"] = raw_single[task] / s["mean_ms"]
    results["one_at_a_time"] = single
    for task, s in solo.items():
        s["efficiency"] = s["throughput"] / raw[task]
    results["solo_8_concurrent"] = solo
    for t in ("clip", "face", "ocr"):
        tasks[t]["share_of_raw"] = tasks[t]["throughput"] / raw[t]
    results["mix"] = tasks
    results["mix_machine_use"] = sum(tasks[t]["share_of_raw"] for t in ("clip", "face", "ocr"))
    results["search_p95_ratio_loaded_vs_idle"] = tasks["search"]["p95_ms"] / results["search_idle"]["p95_ms"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


def print_table(r: dict) -> None:
    raw = r["raw_per_s"]
    print(f"\ncores: {r['cores']}   models: {r['models']}")
    print(
        f"raw ONNX Runtime: CLIP visual {raw['clip']:.2f}/s, search {raw['search']:.1f}/s, "
        f"faces {raw['face']:.2f} images/s ({raw['faces_per_image']:.1f} faces/image), OCR {raw['ocr']:.2f}/s\n"
    )
    print(f"server allocator: {r.get('allocator', '?')}\n")
    drift = r.get("raw_drift", {})
    if drift:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in drift.items())
        print(f"raw ONNX Runtime after / before the server's phases: {shown}")
    print("| one request at a time | server mean ms | p95 ms | raw ONNX Runtime ms | raw / server |")
    print("|---|---|---|---|---|")
    for t, s in r["one_at_a_time"].items():
        print(f"| {t} | {s['mean_ms']:.0f} | {s['p95_ms']:.0f} | {s['raw_ms']:.0f} | {s['raw_share']:.2f} |")
    print()
    print("| phase | task | throughput/s | p50 ms | p95 ms | p99 ms | errors | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    s = r["search_idle"]
    print(
        f"| idle | search | {s['throughput']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} "
        f"| {s['errors']} | |"
    )
    for t, s in r["solo_8_concurrent"].items():
        print(
            f"| alone, 8 concurrent | {t} | {s['throughput']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
            f"| {s['p99_ms']:.0f} | {s['errors']} | {s['efficiency']:.2f} |"
        )
    for t, s in r["mix"].items():
        share = f"{s['share_of_raw']:.2f} of raw" if "share_of_raw" in s else ""
        print(
            f"| Immich mix | {t} | {s['throughput']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
            f"| {s['p99_ms']:.0f} | {s['errors']} | {share} |"
        )
    print(
        f"\nmix uses {r['mix_machine_use']:.2f} of the machine (sum of shares of raw); "
        f"search p95 under load / idle = {r['search_p95_ratio_loaded_vs_idle']:.2f}"
    )
    if r["rss_mb"]:
        m = r["rss_mb"]
        print(
            f"server RSS in the mix: peak {m['peak']:.0f} MB, first quarter {m['first_quarter']:.0f} MB, "
            f"last quarter {m['last_quarter']:.0f} MB"
        )
        print("\n| phase | RSS mean MB | RSS peak MB |\n|---|---|---|")
        for phase, v in m["phases"].items():
            print(f"| {phase} | {v['mean']:.0f} | {v['peak']:.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
