"""immich-aio and upstream Immich ML side by side on this machine: same model files, same images, A B A B.

    python scripts/side_by_side.py --immich-ml /path/to/immich-ml-venv/bin/python \\
        --immich-ml-src /path/to/immich/machine-learning

Immich ML is not installed by this script: install it as its own project says (its `uv.lock`, the `cpu`
extra) into an environment of its own, and name that environment's Python here. It is started the way its
CPU image starts it (`python -m immich_ml`, mimalloc preloaded, `MACHINE_LEARNING_MODEL_ARENA=false`), with
the image's defaults otherwise; immich-aio with its defaults. Both read one model folder (byte-identical
files, laid out as Immich ML caches them): CLIP `ViT-B-16__openai` (a ViT-B/16 image tower and a BERT-base
text tower, random weights), SCRFD-10G-class + ArcFace-R50-class stand-ins for `buffalo_l`, and Immich's real
`PP-OCRv5_mobile` (see scripts/bench_models.py).

Each round starts each server fresh, A then B, and measures, with the whole process tree's RSS (and its anonymous
part, what the kernel cannot drop: the rest is pages of mapped files) and its PSS (each page counted once, as a
container's memory counts it; RSS counts a page once per mapping) sampled four times a second:
 1. cold: the first request of each task right after start (model load included): CLIP visual, faces,
    OCR, search, in that order; twice, each time after a fresh start: with every file of the model folder
    read into the page cache first ("files in memory", as shortly after the last use) and with all of them
    dropped from it ("files on disk", as after a reboot or a long idle: this VM pages out files untouched for
    a minute); the other phases start from files in memory;
 2. one request at a time per task (p50 over the 1440-px previews);
 3. idle, every model loaded (what RSS settles at in the last 3 s);
 4. each image task alone at 8 concurrent requests (throughput, peak RSS, the process tree's CPU time per request);
 5. Immich's job mix: 2 CLIP + 2 face + 1 OCR streams and a search every 2 s (throughput, search p95, peak RSS,
    cores busy, and each task's share of the CPU: its throughput times its CPU time per request alone);
 6. a library through Immich's queues: the same `--library` photos (32) for each queue, taken by as many
    workers as Immich's defaults give it (2 CLIP, 2 face, 1 OCR), and a search every 2 s: the seconds until each
    queue is done and until all are (what a user waits for after an import: a queue that is done leaves the cores
    to the others, which the mix's fixed streams never do, so how a server shares the cores between tasks moves
    when each finishes, and only the work to do moves when all do);
 7. started again with a 4 s model TTL: the same image mix with a search every 7 s, so that every search
    loads its model again under load (what the default 300 s TTL does to a household's occasional search).
In round 1 each server's answers to the same three previews and two searches are kept, and how far apart the two
servers' answers are is printed under the table: the largest difference between their CLIP and face vectors (same
files; the two ONNX Runtime versions round differently), their face boxes and their OCR lines.
First of all Immich ML starts once and makes every first request: it rewrites a face recogniser without a batch axis
in place, as a user's store then keeps it, and the files must not change between phases (a warning says if any did).
Before the rounds, immich-aio starts on files it has not seen (`.ort-cache` and `.sha256` cleared first, files
on disk, after a warm-up start as in the rounds) once per round, and only the first request of each task is
measured (the median of each is reported); then once more, staying quiet until its optimised-model copies and
packed weights are written (child processes do that once a server is quiet), as every later start and TTL reload
finds them.
Requests measured one by one (phases 1 and 2) go over one HTTP client whose connections are kept alive, as Immich's
server keeps its connection to the ML server; the phases with concurrent streams give each stream its own.
Every figure is reported as immich-aio ÷ Immich ML per round (adjacent runs, so a machine that drifts
between rounds drifts for both) and the median of those ratios: below 1 is faster or lighter.
Only 127.0.0.1 is targeted; every phase stops by itself at its deadline.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from bench import (
    ENTRIES,
    ROOT,
    Load,
    RssMonitor,
    allocator_in,
    cpu_seconds,
    form,
    free_port,
    previews,
    tree,
    wait_until_up,
)

CLIP = "ViT-B-16__openai"
SIDE_ENTRIES = {
    **ENTRIES,
    "clip": {"clip": {"visual": {"modelName": CLIP}}},
    "search": {"clip": {"textual": {"modelName": CLIP}}},
}
TASKS = ("clip", "face", "ocr", "search")
IMAGE_TASKS = ("clip", "face", "ocr")
QUEUES = {"clip": 2, "face": 2, "ocr": 1}  # Immich's default concurrency of its smart search, face and OCR queues
MIX = [(t, 0.0) for t, workers in QUEUES.items() for _ in range(workers)]  # the mix's streams, back to back
LIBRARY_DEADLINE_S = 900.0  # a library phase stops by itself here (each queue's time is then NaN)
MIMALLOC = ("/usr/lib/libmimalloc.so.2", "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
            "/usr/lib/aarch64-linux-gnu/libmimalloc.so.2")  # fmt: skip
AIO, IML = "immich-aio", "Immich ML"


def layout(store: Path) -> dict[str, str]:
    """The shared model folder: the benchmark's stand-ins plus the CLIP towers in Immich's own layout."""
    from bench_models import ensure, immich_clip_vit_b16

    made = ensure(store)
    folder = store / "clip" / CLIP
    if not (folder / "textual" / "tokenizer.json").is_file():
        immich_clip_vit_b16(folder, store / "clip" / "CN-CLIP-ViT-B-16")
        made["immich clip"] = f"{CLIP}: the CN-CLIP stand-in's towers in Immich's layout"
    return made


def _python_says(python: str, code: str, env: dict[str, str]) -> str:
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


class Server:
    """How to start one of the two servers on a port, and what it runs on."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd

    def versions(self) -> dict[str, str]:
        code = "import onnxruntime, numpy; print(onnxruntime.__version__, numpy.__version__)"
        ort, _, np_ = _python_says(self.argv[0], code, self.env).partition(" ")
        return {"onnxruntime": ort, "numpy": np_, "LD_PRELOAD": self.env.get("LD_PRELOAD", "")}

    @contextmanager
    def running(self, port: int, extra_env: dict[str, str] | None = None):
        env = dict(self.env, IMMICH_HOST="127.0.0.1", IMMICH_PORT=str(port), **(extra_env or {}))
        with tempfile.TemporaryFile() as log:
            # its own process group, so that gunicorn's workers go with it
            proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log, stderr=log, start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            try:
                wait_until_up(base, proc, log, self.name)
                yield base, proc.pid
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def servers(args: argparse.Namespace, store: Path) -> dict[str, Server]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MACHINE_LEARNING_", "IMMICH_"))}
    base |= {"MACHINE_LEARNING_CACHE_FOLDER": str(store), "HF_HUB_OFFLINE": "1", "ORT_DISABLE_TELEMETRY": "1"}
    iml_python = Path(args.immich_ml)
    iml_env = dict(base, PATH=f"{iml_python.parent}{os.pathsep}{base.get('PATH', '')}")  # it runs `python -m gunicorn`
    iml_env["MACHINE_LEARNING_MODEL_ARENA"] = "false"  # its CPU image's setting
    if args.immich_ml_src:
        iml_env["PYTHONPATH"] = str(Path(args.immich_ml_src).resolve())
    mimalloc = args.mimalloc or next((m for m in MIMALLOC if Path(m).is_file()), None)
    if mimalloc:
        iml_env["LD_PRELOAD"] = mimalloc
    else:
        print("warning: libmimalloc.so.2 not found: Immich ML runs on glibc malloc, not as its image does "
              "(Debian: apt install libmimalloc2.0)", file=sys.stderr)  # fmt: skip
    aio_env = dict(base, **dict(kv.split("=", 1) for kv in args.aio_env))
    return {
        AIO: Server(AIO, [args.aio_python, "-m", "immich_aio"], aio_env, ROOT),
        IML: Server(IML, [str(iml_python), "-m", "immich_ml"], iml_env, Path(args.immich_ml_src or ROOT)),
    }


@functools.cache
def client() -> httpx.Client:
    """The one HTTP client of every request measured one by one, its connections kept alive, as Immich's server
    keeps its own to the ML server. A new client per request (`httpx.post`) put 30-55 ms of the client's own setup
    (its TLS context, made even for plain http) into every time measured, the same for both servers, which drew
    each one-at-a-time ratio towards 1 (a search: 127 vs 125 ms that way, 72 vs 84 ms on kept connections)."""
    return httpx.Client(timeout=300)


def answer(base: str, task: str, image: bytes, text: str = "a cat on a sofa") -> tuple[httpx.Response, float]:
    """One request and its seconds; raises unless it is answered 200."""
    data, files = form(SIDE_ENTRIES[task], task, image, text)
    session = client()
    start = time.perf_counter()
    r = session.post(base + "/predict", data=data, files=files)
    if r.status_code != 200:
        raise RuntimeError(f"{task}: HTTP {r.status_code}: {r.text[:300]}")
    return r, time.perf_counter() - start


def post(base: str, task: str, image: bytes, text: str = "a cat on a sofa") -> float:
    return answer(base, task, image, text)[1]


def cold(base: str, images: list[bytes]) -> dict[str, float]:
    """The first request of each task, in the same order for both servers (ms)."""
    return {t: 1000 * post(base, t, images[0]) for t in TASKS}


def page_cache(store: Path, state: str, rest: float = 0.0) -> int:
    """Put every file of the model folder (the optimised copies included) in one page-cache state for both servers,
    returning the bytes touched: "disk" drops them (as after a reboot, or after this VM paged files untouched for a
    minute out), "memory" reads them all (as shortly after the last use). Without this the two servers' first
    requests met whatever the previous phases had left: Immich ML reads the model files, immich-aio its copies.

    After a drop it waits `rest` seconds: the project's VM got dropped files back from a cache below it for a
    while (the first half GB read at 1.6-2 GB/s 5 s after the drop, everything at 0.4-0.6 GB/s after 20 s), which
    is not what a reboot or a long idle leaves."""
    total = 0
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile (a copy being replaced)
        try:
            if state == "disk":
                os.fdatasync(fd)  # written pages must reach the disk before they can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            else:
                while block := os.read(fd, 8 << 20):
                    total += len(block)
        finally:
            os.close(fd)
    if state == "disk" and rest > 0:
        time.sleep(rest)
    return total


def one_run(server: Server, images: list[bytes], args: argparse.Namespace, say, store: Path) -> dict:
    """Every phase against one freshly started server; the first requests twice, from each page-cache state."""
    out: dict = {"cold_ms": {}}
    with server.running(free_port()) as (base, _pid):
        # every library either server imports, lazily on a first request included, read once as a restart finds
        # them: Immich ML's first start of a round otherwise paid for them (1.5-1.7 s CLIP requests, 0.8 s after)
        cold(base, images)
    for state in ("memory", "disk"):
        page_cache(store, state, args.disk_rest)
        out["cold_ms"][state] = cold_only(server, images)
        say(f"  {server.name}: first requests, files {'in memory' if state == 'memory' else 'on disk'}: "
            + ", ".join(f"{t} {v:.0f} ms" for t, v in out["cold_ms"][state].items()))  # fmt: skip
    page_cache(store, "memory")
    started = time.perf_counter()
    with server.running(free_port()) as (base, pid), RssMonitor(pid) as rss:
        out["start_s"] = time.perf_counter() - started
        out["allocator"] = " + ".join(sorted({allocator_in(p) for p in tree(pid)}))
        rss.phase = "first requests"
        cold(base, images)
        out["answers"] = answers(base, images[:3])
        rss.phase = "one at a time"
        single = {}
        for t in TASKS:
            times = [post(base, t, images[i % len(images)], f"query {i}") for i in range(args.single)]
            single[t] = 1000 * statistics.median(times)
        # most previews hold no face, so the p50 above is mostly the detector: the photo with the most faces
        # shows the recogniser's share (a face request was once 0.58x Immich ML's time and later 1.26x)
        busiest, faces = max(enumerate(face_counts(base, images)), key=lambda kv: kv[1])
        single["face, busiest photo"] = 1000 * statistics.median(post(base, "face", images[busiest]) for _ in range(8))
        out["busiest_faces"] = faces
        out["one_ms"] = single
        rss.phase = "idle"
        time.sleep(args.idle)
        out["idle_rss_mb"] = statistics.median(rss.samples["idle"][-12:])  # its last 3 s: what it settled at
        out["idle_anon_mb"] = statistics.median(rss.anon["idle"][-12:])
        out["idle_pss_mb"] = statistics.median(rss.pss["idle"][-12:])
        alone = {}
        for t in IMAGE_TASKS:
            rss.phase = f"alone {t}"
            load = Load(base, images, SIDE_ENTRIES)
            cpu = cpu_seconds(pid)
            load.run([(t, 0)] * 8, args.alone)
            cpu = cpu_seconds(pid) - cpu
            alone[t] = load.summary(t) | {"peak_rss_mb": max(rss.samples[f"alone {t}"], default=float("nan")),
                                          "peak_pss_mb": max(rss.pss[f"alone {t}"], default=float("nan")),
                                          "cpu_ms": 1000 * cpu / max(1, load.done[t])}  # fmt: skip
        out["alone"] = alone
        rss.phase = "mix"
        mix = Load(base, images, SIDE_ENTRIES)
        cpu = cpu_seconds(pid)
        mix.run([*MIX, ("search", 2.0)], args.mix)
        out["mix_cores"] = (cpu_seconds(pid) - cpu) / mix.elapsed
        out["mix"] = {t: mix.summary(t) for t in TASKS}
        out["mix_peak_rss_mb"] = max(rss.samples["mix"])
        out["mix_peak_anon_mb"] = max(rss.anon["mix"])
        out["mix_peak_pss_mb"] = max(rss.pss["mix"])
        rss.phase = "library"
        lib = Load(base, images, SIDE_ENTRIES)
        out["library"] = lib.library(list(QUEUES.items()), args.library, LIBRARY_DEADLINE_S, search_every=2.0)
        out["library_search"] = lib.summary("search")
        out["library_errors"] = sum(lib.errors.values())
        out["peak_pss_mb"] = max(max(v) for v in rss.pss.values() if v)
        out["peak_rss_mb"] = max(max(v) for v in rss.samples.values() if v)
    errors = sum(s["errors"] for s in [*out["alone"].values(), *out["mix"].values()]) + out["library_errors"]
    say(f"  {server.name}: idle {out['idle_rss_mb']:.0f} MB ({out['idle_anon_mb']:.0f} anonymous), "
        f"mix peak {out['mix_peak_rss_mb']:.0f} MB ({out['mix_peak_anon_mb']:.0f} anonymous), "
        f"errors {errors}")  # fmt: skip
    return out


SEARCHES = ("a cat on a sofa", "海边的日落")


def answers(base: str, images: list[bytes]) -> dict[str, list]:
    """What a server answers to the same inputs, per task, as plain lists (kept in the JSON)."""
    out: dict[str, list] = {"clip": [], "search": [], "face": [], "ocr": []}
    for image in images:
        out["clip"].append(json.loads(answer(base, "clip", image)[0].json()["clip"]))
        faces = answer(base, "face", image)[0].json()["facial-recognition"]
        out["face"].append([{"box": [f["boundingBox"][k] for k in ("x1", "y1", "x2", "y2")],
                             "embedding": json.loads(f["embedding"]), "score": f["score"]} for f in faces])  # fmt: skip
        ocr = answer(base, "ocr", image)[0].json()["ocr"]
        out["ocr"].append({"text": ocr["text"], "box": ocr["box"]})
    for text in SEARCHES:
        out["search"].append(json.loads(answer(base, "search", images[0], text)[0].json()["clip"]))
    return out


def agreement(a: dict[str, list], b: dict[str, list]) -> dict[str, str]:
    """How far apart two servers' answers to the same inputs are (answers() of each), in words per task."""

    def vectors(x: list[list[float]], y: list[list[float]]) -> str:
        if [len(u) for u in x] != [len(v) for v in y]:
            return "different lengths"
        if not x:
            return "none"
        worst = max(abs(p - q) for u, v in zip(x, y, strict=True) for p, q in zip(u, v, strict=True))
        cos = min(sum(p * q for p, q in zip(u, v, strict=True)) / (_norm(u) * _norm(v) or 1.0)
                  for u, v in zip(x, y, strict=True))  # fmt: skip
        return f"cosine ≥ {cos:.7f}, largest difference {worst:.1e}"

    out = {"clip": vectors(a["clip"], b["clip"]), "search": vectors(a["search"], b["search"])}
    counts = [len(x) for x in a["face"]], [len(x) for x in b["face"]]
    if counts[0] != counts[1]:
        out["faces"] = f"different faces found: {counts[0]} against {counts[1]} per photo"
    else:
        pairs = [(f, g) for x, y in zip(a["face"], b["face"], strict=True) for f, g in zip(x, y, strict=True)]
        boxes = max((abs(p - q) for f, g in pairs for p, q in zip(f["box"], g["box"], strict=True)), default=0.0)
        embeddings = vectors([f["embedding"] for f, _ in pairs], [g["embedding"] for _, g in pairs])
        out["faces"] = f"{sum(counts[0])} alike, boxes within {boxes:g} px, embeddings {embeddings}"
    lines = [(x["text"], y["text"]) for x, y in zip(a["ocr"], b["ocr"], strict=True)]
    total = sum(max(len(x), len(y)) for x, y in lines)
    alike = sum(sum((Counter(x) & Counter(y)).values()) for x, y in lines)
    order = "in the same order" if all(x == y for x, y in lines) else "in another order"
    # the boxes of lines read alike, matched by their text (each box: 8 corner coordinates over the image's size)
    shifts = [
        abs(p - q)
        for x, y in zip(a["ocr"], b["ocr"], strict=True)
        for text, box in _boxes(x).items()
        if text in (other := _boxes(y))
        for p, q in zip(box, other[text], strict=True)
    ]
    where = f", their boxes within {100 * max(shifts):.1f} % of the image" if shifts else ""
    out["ocr"] = f"{alike} of {total} lines read alike, {order}{where}"
    return out


def _boxes(ocr: dict) -> dict[str, list[float]]:
    """Each line's box by its text (OCR's flat list, 8 per line), for lines whose text is there once."""
    texts = ocr["text"]
    return {t: ocr["box"][8 * i : 8 * i + 8] for i, t in enumerate(texts) if texts.count(t) == 1}


def _norm(v: list[float]) -> float:
    return sum(p * p for p in v) ** 0.5


def agreement_line(found: dict[str, str]) -> str:
    return "Answers to the same inputs, immich-aio against Immich ML (round 1): " + "; ".join(
        f"{k}: {v}" for k, v in found.items()
    )


def cpu_split(run: dict) -> dict[str, float]:
    """The share of the mix's image work per task, each task's mix throughput times its CPU time per request alone:
    where a server's cores went in Immich's mix (what moving them from one task to another could buy)."""
    work = {t: run["mix"][t]["throughput"] * run["alone"][t]["cpu_ms"] for t in IMAGE_TASKS}
    total = sum(work.values())
    return {t: w / total if total else float("nan") for t, w in work.items()}


def split_line(runs: dict[str, list[dict]]) -> str:
    """cpu_split of each server, the median of its rounds, in words."""
    parts = []
    for name, rounds in runs.items():
        splits = [cpu_split(r) for r in rounds]
        shares = {t: statistics.median(split[t] for split in splits) for t in IMAGE_TASKS}
        cores = statistics.median(r["mix_cores"] for r in rounds)
        parts.append(f"{name} {cores:.2f} cores busy, " + " / ".join(f"{t} {100 * v:.0f} %" for t, v in shares.items()))
    return "Immich mix, where the CPU went (throughput × CPU time per request alone): " + "; ".join(parts)


def face_counts(base: str, images: list[bytes]) -> list[int]:
    return [len(answer(base, "face", image)[0].json()["facial-recognition"]) for image in images]


def cold_only(server: Server, images: list[bytes]) -> dict[str, float]:
    """The first request of each task right after a start, and nothing else."""
    with server.running(free_port()) as (base, _pid):
        return cold(base, images)


def first_start(server: Server, images: list[bytes], store: Path, rest: float = 0.0) -> dict[str, float]:
    """immich-aio's first requests on model files it has never seen: its optimised copies and hashes cleared, the
    files on disk. A start before it reads the libraries, as every other phase's warm-up start does (without it,
    run right after something that evicted them, this phase once measured 2.4x Immich ML's time, and 0.7x alone)."""
    with server.running(free_port()) as (base, _pid):
        cold(base, images)
    shutil.rmtree(store / ".ort-cache", ignore_errors=True)
    shutil.rmtree(store / ".sha256", ignore_errors=True)
    page_cache(store, "disk", rest)  # as a new install finds files it has just downloaded some time ago
    return cold_only(server, images)


def model_files(store: Path) -> dict[Path, object]:
    """Each model file's identity as the server's registry watches it (immich_aio.store.file_identity: device,
    inode, size, modification time): a file rewritten in place or replaced shows."""
    from immich_aio.store import file_identity

    return {p: file_identity(p) for p in store.rglob("*.onnx") if ".ort-cache" not in p.relative_to(store).parts}


def unsettled(store: Path) -> list[Path]:
    """What the optimised-model cache (immich_aio/ort_cache.py) still has to write: the model files without an
    entry, and the entries of models whose only free input dimension is the batch with neither a packed copy nor
    a note refusing one."""
    import onnx

    from immich_aio import ort_cache, ort_pack

    cache = ort_cache.OrtCache(store)
    sources = [
        store / task / entry["modelName"] / type_ / "model.onnx"
        for entries in SIDE_ENTRIES.values()
        for task, types in entries.items()
        for type_, entry in types.items()
    ]
    waiting = [source for source in sources if not list(cache.folder(source).glob(f"*/{ort_cache.GRAPH}"))]
    for graph in (store / ort_cache.FOLDER).glob(f"*/*/{ort_cache.GRAPH}"):
        entry = graph.parent
        if (entry / ort_cache.PACKED).is_dir() or (entry / ort_cache.NOT_PACKED).exists():
            continue
        inputs = onnx.load(str(graph), load_external_data=False).graph.input
        if ort_pack.fixed_but_batch([[d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in inputs]):
            waiting.append(entry)
    return waiting


def settle(server: Server, images: list[bytes], store: Path, say, timeout: float = 600) -> float:
    """Start immich-aio once more, load every model and stay quiet until its optimised copies and packed weights
    are written: what a server reaches in its first quiet minute, and what every later start and reload finds."""
    started = time.perf_counter()
    with server.running(free_port()) as (base, _pid):
        cold(base, images)
        if httpx.get(base + "/info", timeout=30).json()["providers"] != ["CPUExecutionProvider"]:
            return time.perf_counter() - started  # copies are kept for the CPU provider only (ort_cache.py)
        deadline = time.monotonic() + timeout
        while (left := unsettled(store)) and time.monotonic() < deadline:
            time.sleep(1)
    if left:
        say(f"  warning: {len(left)} model(s) still without their optimised copies after {timeout:.0f} s")
    return time.perf_counter() - started


def reload_run(server: Server, images: list[bytes], seconds: float) -> dict[str, float]:
    """A search whose model expired (TTL 4 s, checked every second) while the image mix runs: each search
    loads the text tower again under load, as a household's occasional search does with the default TTL."""
    ttl = {"MACHINE_LEARNING_MODEL_TTL": "4", "MACHINE_LEARNING_MODEL_TTL_POLL_S": "1"}
    with server.running(free_port(), ttl) as (base, _pid):
        for t in TASKS:
            post(base, t, images[0])
        mix = Load(base, images, SIDE_ENTRIES)
        mix.run([*MIX, ("search", 7.0)], seconds)
        return mix.summary("search")


FIGURES: list[tuple[str, str, object]] = [
    # (row, unit, how to read it from one run)
    *[(f"first request after start, files {where}, {t}", "ms", lambda r, t=t, s=state: r["cold_ms"][s][t])
      for state, where in (("memory", "in memory"), ("disk", "on disk")) for t in TASKS],
    *[(f"one request at a time, {t} p50", "ms", lambda r, t=t: r["one_ms"][t])
      for t in (*TASKS, "face, busiest photo")],
    ("idle RSS, every model loaded", "MB", lambda r: r["idle_rss_mb"]),
    *[(f"alone at 8 concurrent, {t} throughput", "/s", lambda r, t=t: r["alone"][t]["throughput"])
      for t in IMAGE_TASKS],
    *[(f"alone at 8 concurrent, {t} peak RSS", "MB", lambda r, t=t: r["alone"][t]["peak_rss_mb"])
      for t in IMAGE_TASKS],
    # the whole process tree's CPU time over the phase per request answered: what a request costs, its share of
    # the decoding, serving and waiting threads included
    *[(f"alone at 8 concurrent, {t} CPU time per request", "ms", lambda r, t=t: r["alone"][t]["cpu_ms"])
      for t in IMAGE_TASKS],
    *[(f"Immich mix, {t} throughput", "/s", lambda r, t=t: r["mix"][t]["throughput"]) for t in IMAGE_TASKS],
    ("Immich mix, cores busy (CPU time ÷ wall time)", "cores", lambda r: r["mix_cores"]),
    ("Immich mix, search p95", "ms", lambda r: r["mix"]["search"]["p95_ms"]),
    ("Immich mix, peak RSS", "MB", lambda r: r["mix_peak_rss_mb"]),
    ("peak RSS, any phase (loading included)", "MB", lambda r: r["peak_rss_mb"]),
    # RSS's anonymous part: what the kernel cannot drop under memory pressure (the rest is mapped files' pages)
    ("idle anonymous RSS (RssAnon), every model loaded", "MB", lambda r: r["idle_anon_mb"]),
    ("Immich mix, peak anonymous RSS (RssAnon)", "MB", lambda r: r["mix_peak_anon_mb"]),
    # PSS: each page once, shared ones divided among their mappings (immich-aio's two sessions of a model map the
    # same saved weights, which RSS counts twice; a container's memory counts them once)
    ("idle PSS, every model loaded", "MB", lambda r: r["idle_pss_mb"]),
    *[(f"alone at 8 concurrent, {t} peak PSS", "MB", lambda r, t=t: r["alone"][t]["peak_pss_mb"])
      for t in IMAGE_TASKS],
    ("Immich mix, peak PSS", "MB", lambda r: r["mix_peak_pss_mb"]),
    ("peak PSS, any phase (loading included)", "MB", lambda r: r["peak_pss_mb"]),
    ("search under the mix, its model reloaded after the TTL, p50", "ms", lambda r: r["reload"]["p50_ms"]),
    # what a user waits for: every queue's jobs for one library, a queue that is done leaving the cores to the rest
    *[(f"a library through Immich's queues, {t} done", "s", lambda r, t=t: r["library"][t]) for t in (*QUEUES, "all")],
    ("a library through Immich's queues, search p95", "ms", lambda r: r["library_search"]["p95_ms"]),
]  # fmt: skip


def compare(runs: dict[str, list[dict]]) -> list[dict]:
    """Per figure: each side's values by round, the per-round ratios aio ÷ Immich ML, and their median."""
    rows = []
    for row, unit, read in FIGURES:
        a = [read(r) for r in runs[AIO]]  # type: ignore[operator]
        b = [read(r) for r in runs[IML]]  # type: ignore[operator]
        ratios = [x / y for x, y in zip(a, b, strict=True) if y]
        rows.append({"figure": row, "unit": unit, AIO: a, IML: b,
                     "ratio": statistics.median(ratios) if ratios else float("nan")})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    def span(v: list[float]) -> str:
        fmt = "{:.2f}" if max(v, default=0) < 20 else "{:.0f}"
        lo, hi = min(v), max(v)
        return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"

    lines = [f"| figure | {AIO} | {IML} | {AIO} ÷ {IML} (median of rounds) |", "|---|---|---|---|"]
    for r in rows:
        a, b = (" / ".join(f"{v:.0f}" for v in r[k]) if r.get("per_task") else span(r[k]) for k in (AIO, IML))
        lines.append(f"| {r['figure']} ({r['unit']}) | {a} | {b} | **{r['ratio']:.2f}** |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0))), "memory_gib": f"{mem / 2**20:.0f}",
            "python": platform.python_version()}  # fmt: skip


def versions(args: argparse.Namespace, srv: dict[str, Server]) -> dict[str, dict[str, str]]:
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    out = {AIO: {"commit": commit, **srv[AIO].versions()}, IML: srv[IML].versions()}
    code = "import pathlib, tomllib, immich_ml; p = pathlib.Path(immich_ml.__file__).parents[1] / 'pyproject.toml'; "
    code += "print(tomllib.loads(p.read_text())['project']['version'] if p.is_file() else 'unknown')"
    out[IML]["version"] = _python_says(srv[IML].argv[0], code, srv[IML].env)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--immich-ml", required=True, help="the Python of an environment with Immich ML's dependencies")
    ap.add_argument("--immich-ml-src", help="Immich's machine-learning/ folder, when immich_ml is not installed")
    ap.add_argument("--mimalloc", help="libmimalloc.so.2 to preload into Immich ML (default: found in /usr/lib)")
    ap.add_argument("--aio-python", default=sys.executable, help="the Python immich-aio runs in (default: this one)")
    ap.add_argument("--aio-env", action="append", default=[], metavar="KEY=VALUE", help="for immich-aio only")
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".bench", help="where the shared model folder is made")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    ap.add_argument("--single", type=int, default=12, help="requests per task one at a time")
    ap.add_argument("--idle", type=float, default=10, help="seconds idle with every model loaded (>= 3)")
    ap.add_argument("--alone", type=float, default=15, help="seconds of each task alone at 8 concurrent")
    ap.add_argument("--mix", type=float, default=60, help="seconds of Immich's job mix")
    ap.add_argument("--library", type=int, default=32, help="photos in the library run through Immich's queues")
    ap.add_argument("--reload", type=float, default=30, help="seconds of the mix with searches reloading their model")
    ap.add_argument("--disk-rest", type=float, default=30,
                    help="seconds to wait after dropping the model files from the page cache (default 30)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    args = ap.parse_args()
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    store = args.work_dir / "side-by-side-models"
    made = layout(store)
    if made:
        say("models: " + "; ".join(made.values()))
    images = previews()
    srv = servers(args, store)
    info = {"machine": machine(), "versions": versions(args, srv)}
    say(json.dumps(info))
    # immich-aio's first start on these files: no optimised copies yet (ort_cache.py writes them once the server is
    # quiet), measured on its own; then every round starts with them in place, as every later start and reload does
    # one start is one sample of a noisy figure (0.73-1.18 between runs of the same code), so it is made once per
    # round and the median of each task is reported
    # Immich ML rewrites a face recogniser without a batch axis in place on its first load, as a user's store then
    # keeps it: done here, before anything is measured, so that the files do not change between phases (on a new
    # work folder, round 2's immich-aio had to make and pack a new copy of that model while its memory was measured)
    took = sum(cold_only(srv[IML], images).values())
    say(f"  Immich ML, a first start (its face files as it leaves them): {took:.0f} ms")
    files = model_files(store)
    starts = []
    for _ in range(args.rounds):
        starts.append(first_start(srv[AIO], images, store, args.disk_rest))
        say("  immich-aio, first start on new files: " + ", ".join(f"{t} {v:.0f} ms" for t, v in starts[-1].items()))
    first_install = {t: statistics.median(start[t] for start in starts) for t in TASKS}
    say(f"  immich-aio, its second start: optimised copies written, {settle(srv[AIO], images, store, say):.0f} s")
    runs: dict[str, list[dict]] = {AIO: [], IML: []}
    for k in range(args.rounds):
        for name in (AIO, IML):
            say(f"round {k + 1}/{args.rounds}: {name}")
            run = one_run(srv[name], images, args, say, store)
            run["reload"] = reload_run(srv[name], images, args.reload)
            say(f"  {name}: search with its model reloaded under the mix, p50 {run['reload']['p50_ms']:.0f} ms")
            runs[name].append(run)
    if changed := sorted(str(p.relative_to(store)) for p, state in model_files(store).items() if files.get(p) != state):
        say(f"warning: model files changed during the run, its figures mix two versions: {', '.join(changed)}")
    rows = compare(runs)
    theirs = {t: statistics.median(r["cold_ms"]["disk"][t] for r in runs[IML]) for t in TASKS}
    rows.insert(2 * len(TASKS), {"figure": "first request after immich-aio's first start on new files (its copies "
                                 f"not written yet; median of {len(starts)} starts), against Immich ML's first "
                                 "request, files on disk",
                                 "unit": "ms, " + "/".join(TASKS),
                             AIO: [first_install[t] for t in TASKS], IML: [theirs[t] for t in TASKS],
                             "ratio": statistics.median(first_install[t] / theirs[t] for t in TASKS),
                             "per_task": True})  # fmt: skip
    m, v = info["machine"], info["versions"]
    alloc = {name: runs[name][0]["allocator"] for name in runs}
    print(f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {AIO} {v[AIO]['commit']} (ONNX Runtime "
          f"{v[AIO]['onnxruntime']}, {alloc[AIO]}), {IML} {v[IML]['version']} (ONNX Runtime {v[IML]['onnxruntime']}, "
          f"{alloc[IML]}); {args.rounds} rounds A B, mix {args.mix:.0f} s")  # fmt: skip
    print(markdown(rows))
    found = agreement(runs[AIO][0]["answers"], runs[IML][0]["answers"])
    print("\n" + split_line(runs))
    print("\n" + agreement_line(found))
    if args.json:
        args.json.write_text(json.dumps({**info, "runs": runs, "rows": rows, "agreement": found}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
