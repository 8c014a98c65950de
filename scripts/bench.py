"""Benchmark immich-aio against the physical limit: the same ONNX models run directly by ONNX Runtime.

    python scripts/bench.py                 # starts a server on 127.0.0.1, ~3 minutes
    python scripts/bench.py --duration 600  # the 10-minute soak (RSS must stay flat)
    python scripts/bench.py --url http://127.0.0.1:3003 --store ./models --json

Phases, all in one run:
 1. raw ONNX Runtime throughput of each model on prepared tensors (all cores, no HTTP, no decode);
 2. idle search latency (text queries, nothing else running);
 3. each image task alone at 8 concurrent requests -> efficiency = server throughput / raw;
 4. Immich's mix for --duration seconds: 2 CLIP-visual + 2 face + 1 OCR concurrent streams of
    1440-px JPEG previews, plus a person searching every 2 s; per-task throughput, p50/p95/p99,
    errors, and the server's RSS (peak, and first vs last quarter).
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
            "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
            "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
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


def raw_throughput(store: Path, images: list[bytes], seconds: float) -> dict[str, float]:
    """Items per second of each task's models run directly by ONNX Runtime on prepared tensors."""
    import onnxruntime as ort

    from immich_aio.config import Settings
    from immich_aio.imaging import decode_image
    from immich_aio.jobs import Job
    from immich_aio.models.base import Payload
    from immich_aio.runtime import build_resolvers
    from immich_aio.sessions import SessionFactory
    from immich_aio.store import ModelStore

    opts = ort.SessionOptions()  # ORT's own defaults: every core for one run
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def rate(fn, items_per_call: float) -> float:
        fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n * items_per_call / (time.perf_counter() - start)

    settings = Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(store)})
    factory = SessionFactory(settings)
    resolvers = build_resolvers(settings, ModelStore(store), factory)
    arrays = [decode_image(b, 10**9) for b in images]
    out: dict[str, float] = {}

    visual = resolvers["clip"].resolve("visual", CLIP_NAME).build()
    visual.load()
    x = np.stack([visual.prepare(a)[0] for a in arrays[:8]])
    s = session(visual.files["model"])
    name = s.get_inputs()[0].name
    out["clip"] = max(rate(lambda: s.run(None, {name: x[:1]}), 1), rate(lambda: s.run(None, {name: x}), len(x)))
    visual.close()

    textual = resolvers["clip"].resolve("textual", CLIP_NAME).build()
    textual.load()
    ids = textual.prepare(QUERIES[0])[0][None]
    s = session(textual.files["model"])
    out["search"] = rate(lambda: s.run(None, {s.get_inputs()[0].name: ids}), 1)
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
        crops.append(np.stack([align(a, m) for m in found["landmarks"]]) if len(found["boxes"]) else None)
    sd, sr = session(det.files["model"]), session(rec.files["model"])
    dname, rname = sd.get_inputs()[0].name, sr.get_inputs()[0].name

    def face_pass():
        for blob, c in zip(det_blobs, crops, strict=True):
            sd.run(None, {dname: blob})
            if c is not None:
                sr.run(None, {rname: ((c.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)})

    out["face"] = rate(face_pass, len(arrays))
    out["faces_per_image"] = sum(len(c) for c in crops if c is not None) / len(arrays)
    det.close()
    rec.close()

    # OCR: detector at its input size + recogniser on each image's lines
    odet = resolvers["ocr"].resolve("detection", "PP-OCRv5_mobile").build()
    orec = resolvers["ocr"].resolve("recognition", "PP-OCRv5_mobile").build()
    odet.load()
    orec.load()
    from immich_aio.models.ocr import crop_quad, detector_input_size

    jobs = []
    for a in arrays:
        h, w = detector_input_size(*a.shape[:2], 736, 2560)
        import cv2

        bgr = Payload(job=Job(), image=a).bgr()
        blob = ((cv2.resize(bgr, (w, h)).astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        found = odet.predict(Payload(job=Job(), image=a), {"minScore": 0.5, "maxResolution": 736})
        lines = [orec.prepare_line(c) for q in found["boxes"] if (c := crop_quad(bgr, q)) is not None]
        jobs.append((blob, lines))
    so, sl = session(odet.files["model"]), session(orec.files["model"])

    def ocr_pass():
        for blob, lines in jobs:
            so.run(None, {"x": blob})
            for width in sorted({ln.shape[2] for ln in lines}):
                group = [ln for ln in lines if ln.shape[2] == width]
                sl.run(None, {"x": np.stack(group)})

    out["ocr"] = rate(ocr_pass, len(arrays))
    odet.close()
    orec.close()
    return out


# --- server and load ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(store: Path, url: str | None):
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
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "immich_aio"], cwd=ROOT, env=env, stdout=log, stderr=log)
        yield from _serve(proc, log, f"http://127.0.0.1:{port}")


def _serve(proc: subprocess.Popen, log, base: str):
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            log.seek(0)
            raise RuntimeError("server did not start: " + log.read().decode(errors="replace"))
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    """Closed-loop streams against one server; each stream stops by itself at the deadline."""

    def __init__(self, base: str, images: list[bytes]) -> None:
        self.base, self.images = base, images
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.done: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def one(self, client: httpx.Client, task: str, i: int) -> None:
        data = {"entries": json.dumps(ENTRIES[task])}
        files = None
        if task == "search":
            data["text"] = QUERIES[i % len(QUERIES)]
        else:
            files = {"image": ("blob", self.images[i % len(self.images)], "application/octet-stream")}
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

    def stream(self, task: str, deadline: float, offset: int, every: float = 0.0) -> None:
        with httpx.Client() as client:
            i = offset
            while time.monotonic() < deadline:
                started = time.monotonic()
                self.one(client, task, i)
                i += 1
                if every:
                    time.sleep(max(0.0, every - (time.monotonic() - started)))

    def run(self, plan: list[tuple[str, float]], seconds: float, pid: int | None = None) -> list[float]:
        """plan: (task, period; 0 = back to back) per stream. Returns RSS samples (MB, 1 per second)."""
        deadline = time.monotonic() + seconds
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
        return samples

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
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        ap.error("--url must be a server on this machine (127.0.0.1 / localhost)")
    store = args.store or args.work_dir / "models"
    made = {}
    if args.store is None:
        from bench_models import ensure

        made = ensure(store)
    images = previews()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    say("1/4 raw ONNX Runtime throughput")
    raw = raw_throughput(store, images, args.raw)
    models = (
        f"--store {store}" if args.store else f"stand-ins in {store} ({', '.join(made.values()) or 'already there'})"
    )
    results: dict[str, object] = {"cores": os.cpu_count(), "models": models, "raw_per_s": raw}
    with server(store, args.url) as (base, pid):
        warm = Load(base, images)
        warm.run([("clip", 0), ("face", 0), ("ocr", 0), ("search", 0)], 1)  # load every model once
        say("2/4 idle search latency")
        idle = Load(base, images)
        idle.run([("search", 0.2)], 8)
        results["search_idle"] = idle.summary("search")
        solo = {}
        for task in ("clip", "face", "ocr"):
            say(f"3/4 {task} alone, 8 concurrent requests")
            load = Load(base, images)
            load.run([(task, 0)] * 8, args.solo)
            solo[task] = load.summary(task) | {"efficiency": load.summary(task)["throughput"] / raw[task]}
        results["solo_8_concurrent"] = solo
        say(f"4/4 Immich mix for {args.duration:.0f} s")
        mix = Load(base, images)
        rss = mix.run(
            [("clip", 0), ("clip", 0), ("face", 0), ("face", 0), ("ocr", 0), ("search", 2.0)], args.duration, pid
        )
        quarter = max(1, len(rss) // 4)
        tasks = {t: mix.summary(t) for t in ("clip", "face", "ocr", "search")}
        for t in ("clip", "face", "ocr"):
            tasks[t]["share_of_raw"] = tasks[t]["throughput"] / raw[t]
        results["mix"] = tasks
        results["mix_machine_use"] = sum(tasks[t]["share_of_raw"] for t in ("clip", "face", "ocr"))
        results["search_p95_ratio_loaded_vs_idle"] = tasks["search"]["p95_ms"] / results["search_idle"]["p95_ms"]
        results["rss_mb"] = (
            {
                "peak": max(rss),
                "first_quarter": statistics.mean(rss[:quarter]),
                "last_quarter": statistics.mean(rss[-quarter:]),
            }
            if pid
            else None
        )
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
            f"server RSS: peak {m['peak']:.0f} MB, first quarter {m['first_quarter']:.0f} MB, "
            f"last quarter {m['last_quarter']:.0f} MB"
        )


if __name__ == "__main__":
    raise SystemExit(main())
