"""Checks immich-aio on an NVIDIA GPU, against itself on the CPU and against raw ONNX Runtime on CUDA.

    python scripts/gpu_check.py --json out.json > out.md     # ~5 minutes; needs the [gpu] extra and a GPU
    python scripts/gpu_check.py --store ./models             # your own models (Immich's names resolve as served)

Without --store it makes the benchmark's stand-in models once (scripts/bench_models.py: needs the test
dependencies, torch among them). Phases, one run:
 1. the same requests to a CUDA server and a CPU-only server (IMMICH_AIO_PROVIDERS=CPUExecutionProvider):
    CLIP and search vectors (cosine), faces (count, box, vector), OCR (text, box);
 2. the CUDA server's GPU memory with every model loaded, and how many processes hold the GPU;
 3. one request at a time, each task alone at 8 concurrent requests, and Immich's mix, against raw ONNX Runtime
    on CUDA running the same models on prepared tensors (throughput ratios, as scripts/bench.py does on the CPU);
 4. load and unload: a server with a 3 s TTL loads every model and lets it go, three times, reading the GPU
    memory each time; the first request after each load is timed and its answer compared with the first cycle's.
Only 127.0.0.1 is targeted; every loop stops by itself at its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import httpx
import numpy as np

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TASKS = ("clip", "face", "ocr")


def gpu_processes() -> dict[int, float]:
    """pid -> MB of GPU memory, from nvidia-smi (empty where it is missing)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [ln.split(",") for ln in out.strip().splitlines() if ln.strip()]
    return {int(pid): float(mb) for pid, mb in rows if mb.strip().isdigit()}


def server_gpu_mb(pid: int | None) -> tuple[float, int]:
    """The server tree's GPU memory (MB) and the number of its processes holding the GPU."""
    if pid is None:
        return float("nan"), 0
    mine = set(bench.tree(pid))
    held = {p: mb for p, mb in gpu_processes().items() if p in mine}
    return sum(held.values()), len(held)


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def post(client: httpx.Client, base: str, task: str, image: bytes, text: str) -> dict:
    data, files = bench.form(bench.ENTRIES[task], task, image, text)
    r = client.post(base + "/predict", data=data, files=files, timeout=300)
    r.raise_for_status()
    return r.json()


def vector(v: str | list) -> np.ndarray:
    return np.asarray(json.loads(v) if isinstance(v, str) else v, dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _box(face: dict) -> np.ndarray:
    return np.array([face["boundingBox"][k] for k in ("x1", "y1", "x2", "y2")])


def compare(task: str, gpu: dict, cpu: dict) -> dict[str, float]:
    """How far the CUDA answer is from the CPU one."""
    if task in ("clip", "search"):
        return {"min_cos": cosine(vector(gpu["clip"]), vector(cpu["clip"]))}
    if task == "face":
        g, c = gpu["facial-recognition"], cpu["facial-recognition"]
        out = {"count_diff": abs(len(g) - len(c)), "min_cos": 1.0, "box_px": 0.0}
        for face in g if c else ():  # each CUDA face against the CPU face whose box is nearest
            box = _box(face)
            near = min(c, key=lambda f: np.abs(box - _box(f)).max())
            out["box_px"] = max(out["box_px"], float(np.abs(box - _box(near)).max()))
            out["min_cos"] = min(out["min_cos"], cosine(vector(face["embedding"]), vector(near["embedding"])))
        return out
    g, c = gpu["ocr"], cpu["ocr"]
    same = sum(a == b for a, b in zip(g["text"], c["text"], strict=False))
    box = (
        float(np.abs(np.array(g["box"]) - np.array(c["box"])).max() * 1000)
        if len(g["box"]) == len(c["box"]) and g["box"]
        else (0.0 if g["box"] == c["box"] else float("inf"))
    )
    return {"lines_gpu": len(g["text"]), "lines_cpu": len(c["text"]), "lines_same": same, "box_milli": box}


def parity(gpu: str, cpu: str, images: list[bytes]) -> dict[str, dict[str, float]]:
    """Every image (and every query) through both servers; the worst figure per task."""
    worst: dict[str, dict[str, float]] = {}
    with httpx.Client() as client:
        for task in (*TASKS, "search"):
            items = bench.QUERIES if task == "search" else images
            for i, _ in enumerate(items):
                image, text = images[i % len(images)], bench.QUERIES[i % len(bench.QUERIES)]
                d = compare(task, post(client, gpu, task, image, text), post(client, cpu, task, image, text))
                w = worst.setdefault(task, {})
                if task == "ocr":
                    d["lines_total"] = max(d["lines_gpu"], d["lines_cpu"])
                for k, v in d.items():
                    if k.startswith("lines_"):
                        w[k] = w.get(k, 0) + v  # counted over every image
                    else:
                        w[k] = (min if k.startswith("min_") else max)(w.get(k, v), v)
    return worst


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """ONNX Runtime's C++ log (fd 2) into a file, to count its warnings."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def shape_costs(store: Path, images: list[bytes], seconds: float) -> dict[str, dict[str, dict[str, float]]]:
    """Raw ONNX Runtime per input shape, for the models whose shapes change: the first run at a new shape (cuDNN's
    algorithm choice included) and the best of the next two, under cuDNN's exhaustive and heuristic choice and on
    4 CPU threads; with ONNX Runtime's warnings about slow paths counted."""
    import tempfile

    import onnxruntime as ort

    from immich_aio.config import Settings
    from immich_aio.imaging import decode_image
    from immich_aio.runtime import build_resolvers
    from immich_aio.sessions import SessionFactory
    from immich_aio.store import ModelStore

    env = {"MACHINE_LEARNING_CACHE_FOLDER": str(store), "IMMICH_AIO_PROVIDERS": "CPUExecutionProvider"}
    settings = Settings.from_env(env)
    resolvers = build_resolvers(settings, ModelStore(store), SessionFactory(settings))
    arrays = [decode_image(b, 10**9) for b in images]
    odet, orec = bench.ocr_models(resolvers)
    frec = resolvers["facial-recognition"].resolve("recognition", bench.FACE_NAME).build()
    inputs = bench.ocr_inputs(odet, orec, arrays)
    det_feeds = [blob for blob, _ in inputs]
    by_width: dict[int, list[np.ndarray]] = {}
    for _, lines in inputs:
        for ln in lines:
            by_width.setdefault(ln.shape[2], []).append(ln)
    rec_feeds = [np.stack(g[:n]) for g in by_width.values() for n in range(1, len(g) + 1)]  # (batch, width)
    rng = np.random.default_rng(0)
    face_feeds = [rng.standard_normal((n, 3, 112, 112), dtype=np.float32) for n in range(1, 9)]
    models = {
        "ocr detection": (odet.files["model"], det_feeds),
        "ocr recognition": (orec.files["model"], rec_feeds),
        "face recognition": (frec.files["model"], face_feeds),
    }
    odet.close()
    orec.close()
    cuda = {"arena_extend_strategy": "kSameAsRequested"}
    configs: dict[str, list] = {"cpu 4 threads": [CPU]}
    if CUDA in ort.get_available_providers():
        configs = {
            "cuda heuristic": [(CUDA, cuda | {"cudnn_conv_algo_search": "HEURISTIC"}), CPU],
            "cuda exhaustive": [(CUDA, cuda | {"cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU],
            **configs,
        }
    out: dict[str, dict[str, dict[str, float]]] = {}
    per = seconds / (len(models) * len(configs))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, feeds) in models.items():
            for label, providers in configs.items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 4
                opts.log_severity_level = 2  # warnings: slow paths, nodes left to the CPU
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                log = Path(tmp) / "ort.log"
                cold, warm = [], []
                with stderr_to(log):
                    s = ort.InferenceSession(str(path), opts, providers=providers)
                    feed_name = s.get_inputs()[0].name
                    deadline = time.monotonic() + per
                    for x in feeds:
                        if time.monotonic() > deadline:
                            break
                        t = time.perf_counter()
                        s.run(None, {feed_name: x})
                        cold.append(1000 * (time.perf_counter() - t))
                        runs = []
                        for _ in range(2):
                            t = time.perf_counter()
                            s.run(None, {feed_name: x})
                            runs.append(1000 * (time.perf_counter() - t))
                        warm.append(min(runs))
                    del s
                text = log.read_text(errors="replace")
                out.setdefault(name, {})[label] = {
                    "shapes": len(cold),
                    "of": len(feeds),
                    "cold_ms": statistics.median(cold) if cold else float("nan"),
                    "warm_ms": statistics.median(warm) if warm else float("nan"),
                    "fallback_warnings": text.count("Fallback"),
                    "cpu_node_warnings": text.count("not assigned"),
                }
    return out


def wait_unloaded(base: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not httpx.get(base + "/info", timeout=10).json()["models"]:
            return True
        time.sleep(0.25)
    return False


def load_cycles(store: Path, images: list[bytes], cycles: int) -> dict[str, object]:
    """Load every model, let the TTL unload it, `cycles` times: GPU memory, first-request times, same answers."""
    env = {"MACHINE_LEARNING_MODEL_TTL": "3", "MACHINE_LEARNING_MODEL_TTL_POLL_S": "0.5"}
    out: dict[str, object] = {"loaded_mb": [], "unloaded_mb": [], "first_ms": [], "unloaded_in_time": [],
                              "min_cos_vs_first_cycle": 1.0}  # fmt: skip
    first: dict[str, np.ndarray] = {}
    with bench.server(store, None, env) as (base, pid), httpx.Client() as client:
        out["started_mb"] = server_gpu_mb(pid)[0]
        for _ in range(cycles):
            times = {}
            for task in (*TASKS, "search"):
                start = time.perf_counter()
                answer = post(client, base, task, images[0], bench.QUERIES[0])
                times[task] = round(1000 * (time.perf_counter() - start))
                if task in ("clip", "search"):
                    v = vector(answer["clip"])
                    first.setdefault(task, v)
                    out["min_cos_vs_first_cycle"] = min(out["min_cos_vs_first_cycle"], cosine(v, first[task]))
            out["first_ms"].append(times)
            out["loaded_mb"].append(server_gpu_mb(pid)[0])
            out["unloaded_in_time"].append(wait_unloaded(base, 30))
            time.sleep(1)
            out["unloaded_mb"].append(server_gpu_mb(pid)[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="model store (default: a work folder with stand-in models)")
    ap.add_argument("--work-dir", type=Path, default=bench.ROOT / ".bench")
    ap.add_argument("--seconds", type=float, default=15, help="seconds of each load phase")
    ap.add_argument("--raw", type=float, default=4, help="seconds per raw ONNX Runtime measurement")
    ap.add_argument("--cycles", type=int, default=3, help="load/unload cycles")
    ap.add_argument("--shapes", type=float, default=60, help="seconds for the per-shape costs (0: skip them)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument(
        "--providers", default=CUDA, help="the server under test's providers (CPUExecutionProvider tries the script)"
    )
    args = ap.parse_args()
    import onnxruntime as ort

    if CUDA in args.providers.split(",") and CUDA not in ort.get_available_providers():
        ap.error(
            f"this ONNX Runtime has no CUDA ({', '.join(ort.get_available_providers())}): install the [gpu] extra; "
            "--providers CPUExecutionProvider tries the script without a GPU"
        )
    if args.store is None:
        from bench_models import ensure

        args.store = args.work_dir / "models"
        ensure(args.store)

    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    images = bench.previews()
    providers = args.providers.split(",")
    res: dict[str, object] = {"gpu": gpu_name(), "onnxruntime": ort.__version__, "cores": os.cpu_count()}
    res |= {"ort_providers": ort.get_available_providers(), "images": len(images)}
    under_test = {} if args.providers == CUDA else {"IMMICH_AIO_PROVIDERS": args.providers}
    cpu_env = {"IMMICH_AIO_PROVIDERS": "CPUExecutionProvider"}
    if args.shapes:
        say("0/4 raw ONNX Runtime per input shape")
        res["shapes"] = shape_costs(args.store, images, args.shapes)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str))
    say("1/4 the same requests on the GPU and on the CPU")
    with ExitStack() as stack:
        gpu, gpu_pid = stack.enter_context(bench.server(args.store, None, under_test))
        info = httpx.get(gpu + "/info", timeout=30).json()
        res["server_providers"], res["threads"] = info["providers"], info["threads"]
        if info["providers"][0] != providers[0]:
            raise SystemExit(
                f"the server runs on {info['providers']}, not {providers[0]}: start `immich-aio` to read why in its log"
            )
        with bench.server(args.store, None, cpu_env) as (cpu, _):
            res["parity"] = parity(gpu, cpu, images)
        say("2/4 GPU memory, every model loaded")
        res["gpu_mb_loaded"], res["gpu_processes"] = server_gpu_mb(gpu_pid)
        say("3/4 one at a time, alone at 8, Immich's mix")
        single, alone = {}, {}
        for task in (*TASKS, "search"):
            load = bench.Load(gpu, images)
            load.run([(task, 0)], args.seconds / 2)
            single[task] = load.mean_ms(task)
        for task in TASKS:
            load = bench.Load(gpu, images)
            load.run([(task, 0)] * 8, args.seconds)
            alone[task] = load.summary(task)
        mix = bench.Load(gpu, images)
        mix.run([("clip", 0), ("clip", 0), ("face", 0), ("face", 0), ("ocr", 0), ("search", 2.0)], args.seconds * 2)
        res["mix"] = {t: mix.summary(t) for t in (*TASKS, "search")}
        res["gpu_mb_after_mix"] = server_gpu_mb(gpu_pid)[0]
    raw, raw_single = bench.raw_throughput(args.store, images, args.raw, providers)
    res["raw"], res["raw_single_ms"], res["single_ms"] = raw, raw_single, single
    res["alone"] = alone
    say("4/4 load and unload")
    res["cycles"] = load_cycles(args.store, images, args.cycles)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print(report(res))
    return 0


def report(r: dict) -> str:
    p, raw, alone, mix = r["parity"], r["raw"], r["alone"], r["mix"]
    c = r["cycles"]
    lines = [
        f"GPU: {r['gpu']}; ONNX Runtime {r['onnxruntime']}; server providers {r['server_providers']}; "
        f"{r['cores']} cores; {r['images']} previews",
        "",
        "| | CUDA vs CPU server |",
        "|---|---|",
        f"| CLIP / search vectors, lowest cosine | {p['clip']['min_cos']:.6f} / {p['search']['min_cos']:.6f} |",
        f"| faces: count differences, largest box difference, lowest cosine | {p['face']['count_diff']:.0f}, "
        f"{p['face']['box_px']:.1f} px, {p['face']['min_cos']:.6f} |",
        f"| OCR: lines read alike | {p['ocr']['lines_same']:.0f} of {p['ocr']['lines_total']:.0f} "
        f"(largest box difference {p['ocr']['box_milli']:.2f} thousandths of the side) |",
        "",
        f"GPU memory, every model loaded: {r['gpu_mb_loaded']:.0f} MB in {r['gpu_processes']} process(es); "
        f"after the mix {r['gpu_mb_after_mix']:.0f} MB",
        "",
        "| task | one request, server / raw ORT (ms) | alone at 8: server / raw ORT (/s) | mix (/s) | mix p95 (ms) |",
        "|---|---|---|---|---|",
    ]
    for t in (*TASKS, "search"):
        a = alone.get(t, {}).get("throughput", float("nan"))
        lines.append(
            f"| {t} | {r['single_ms'][t]:.0f} / {r['raw_single_ms'][t]:.0f} | "
            f"{a:.1f} / {raw[t]:.1f} ({a / raw[t]:.2f}) | {mix[t]['throughput']:.2f} | {mix[t]['p95_ms']:.0f} |"
        )
    if r.get("shapes"):
        lines += [
            "",
            "| raw ONNX Runtime, per input shape | first run at a shape (ms) | again (ms) | shapes | slow paths |",
            "|---|---|---|---|---|",
        ]
        for model, by in r["shapes"].items():
            for label, v in by.items():
                lines.append(
                    f"| {model}, {label} | {v['cold_ms']:.1f} | {v['warm_ms']:.1f} | {v['shapes']} of {v['of']} | "
                    f"{v['fallback_warnings']} fallback, {v['cpu_node_warnings']} CPU-node |"
                )
    errors = sum(v["errors"] for v in mix.values()) + sum(v["errors"] for v in alone.values())
    lines += [
        f"\nErrors under load: {errors}.",
        f"Load/unload ({len(c['loaded_mb'])} cycles, TTL 3 s): GPU memory at start {c['started_mb']:.0f} MB, loaded "
        f"{', '.join(f'{v:.0f}' for v in c['loaded_mb'])} MB, unloaded "
        f"{', '.join(f'{v:.0f}' for v in c['unloaded_mb'])}"
        f" MB (unloaded in time: {c['unloaded_in_time']}); first requests (ms) "
        + "; ".join(", ".join(f"{k} {v}" for k, v in cyc.items()) for cyc in c["first_ms"])
        + f"; lowest cosine against the first cycle {c['min_cos_vs_first_cycle']:.6f}",
        f"Faces per image: {raw.get('faces_per_image', float('nan')):.1f}. "
        "Mean one-at-a-time ratio server/raw: "
        f"{statistics.mean(r['single_ms'][t] / r['raw_single_ms'][t] for t in TASKS):.2f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
