"""Soak test: Immich's job mix plus a hostile client for a long time, watching memory, errors and /ping.

    python scripts/soak.py                     # 30 minutes on 127.0.0.1 with stand-in models
    python scripts/soak.py --duration 3600 --json
    python scripts/soak.py --url http://127.0.0.1:3003 --store ./models
    IMMICH_AIO_ALLOCATOR=jemalloc python scripts/soak.py   # the server inherits the environment

Streams, all at once, each stopping by itself at the deadline:
- Immich's mix: 2 CLIP-visual + 2 face + 1 OCR streams of 1440-px JPEG previews, a search every 2 s;
- a hostile client, one request a second from a rotating list: malformed entries, undecodable and
  truncated images, a pixel bomb (header only), an upload over the limit, a client that disconnects
  half-way through its upload, another that sends half its headers and waits to be cut off;
- a /ping probe every second (Immich's health check), timing each answer.
The server's RSS is sampled every few seconds. After the warm-up, the report gives the RSS trend (a
least-squares slope in MB/hour over all of it and over its second half, where a leak would still grow but
a settling high-water mark would not, and the mean of each five minutes), the peak, every status seen
per stream (good requests must all be 200, hostile ones all 4xx), and the slowest /ping.
Only 127.0.0.1 is targeted (not part of the test suite: `bash scripts/test.sh` does not run it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import httpx

UPLOAD_LIMIT_MB = 8  # the soak server's IMMICH_AIO_MAX_UPLOAD_MB, so an oversized upload stays cheap


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


class Hostile:
    """One bad request a second; each kind is expected to get a 4xx (or to be cut off), never a 5xx."""

    def __init__(self, base: str, images: list[bytes]) -> None:
        self.base, self.images = base, images
        self.statuses: Counter[str] = Counter()
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.addr = (host.strip("[]"), int(port))

    def kinds(self) -> list[tuple[str, object]]:
        ocr = json.dumps(bench.ENTRIES["ocr"])
        photo = self.images[0]
        return [
            ("bad-json", {"entries": "{not json"}),
            ("unknown-task", {"entries": '{"oops":{"visual":{"modelName":"x"}}}'}),
            ("bad-option", {"entries": ocr.replace("0.5", '"high"', 1), "image": photo}),
            ("bad-name", {"entries": ocr.replace("PP-OCRv5_mobile", "../" * 50 + "x y"), "image": photo}),
            ("garbage-image", {"entries": ocr, "image": os.urandom(20_000)}),
            ("truncated-jpeg", {"entries": ocr, "image": photo[: len(photo) // 3]}),
            ("pixel-bomb", {"entries": ocr, "image": png_header(60_000, 60_000)}),
            ("too-large", {"entries": ocr, "image": os.urandom((UPLOAD_LIMIT_MB + 1) * 1024 * 1024)}),
            (
                "both-clip-types",
                {
                    "entries": '{"clip":{"visual":{"modelName":"ViT-B-32__openai"},'
                    '"textual":{"modelName":"ViT-B-32__openai"}}}',
                    "image": photo,
                    "text": "x",
                },
            ),
            ("leaves-mid-upload", "raw-disconnect"),
            ("stalls-in-headers", "raw-stall"),
        ]

    def one(self, client: httpx.Client, name: str, spec: object) -> None:
        if spec == "raw-disconnect":
            with socket.create_connection(self.addr, timeout=10) as s:
                s.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b'Content-Length: 900000\r\n\r\n--b\r\nContent-Disposition: form-data; name="image"; '
                    b'filename="x"\r\n\r\n' + os.urandom(50_000)
                )
            self.statuses[f"{name} -> closed by client"] += 1
            return
        if spec == "raw-stall":
            threading.Thread(target=self._stall, args=(name,), daemon=True).start()
            return
        assert isinstance(spec, dict)
        data = {k: v for k, v in spec.items() if k != "image"}
        files = {"image": ("blob", spec["image"], "application/octet-stream")} if "image" in spec else None
        try:
            status = str(client.post(self.base + "/predict", data=data, files=files, timeout=120).status_code)
        except httpx.HTTPError as e:
            status = type(e).__name__
        self.statuses[f"{name} -> {status}"] += 1

    def _stall(self, name: str) -> None:
        try:
            with socket.create_connection(self.addr, timeout=120) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                started = time.monotonic()
                closed = s.recv(100) == b""
                self.statuses[
                    f"{name} -> {'cut off' if closed else 'answered'} after {time.monotonic() - started:.0f} s"
                ] += 1
        except OSError as e:
            self.statuses[f"{name} -> {type(e).__name__}"] += 1

    def run(self, deadline: float) -> None:
        kinds = self.kinds()
        with httpx.Client() as client:
            i = 0
            while time.monotonic() < deadline:
                started = time.monotonic()
                name, spec = kinds[i % len(kinds)]
                self.one(client, name, spec)
                i += 1
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def ping_probe(base: str, deadline: float, out: list[float]) -> None:
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                ok = client.get(base + "/ping", timeout=5).text == "pong"
            except httpx.HTTPError:
                ok = False
            out.append((time.perf_counter() - started) * 1000 if ok else float("inf"))
            time.sleep(1.0)


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    mt, my = statistics.mean(ts), statistics.mean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="soak a running server (127.0.0.1 only) instead of starting one")
    ap.add_argument("--store", type=Path, help="model store (default: the benchmark's stand-in models)")
    ap.add_argument("--work-dir", type=Path, default=bench.ROOT / ".bench")
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load (default 30 minutes)")
    ap.add_argument("--warmup", type=float, default=300, help="seconds excluded from the RSS trend")
    ap.add_argument("--sample", type=float, default=5, help="seconds between RSS samples")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        ap.error("--url must be a server on this machine (127.0.0.1 / localhost)")
    store = args.store or args.work_dir / "models"
    if args.store is None:
        from bench_models import ensure

        ensure(store)
    images = bench.previews()
    os.environ["IMMICH_AIO_MAX_UPLOAD_MB"] = str(UPLOAD_LIMIT_MB)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    with bench.server(store, args.url) as (base, pid):
        bench.Load(base, images).run([("clip", 0), ("face", 0), ("ocr", 0), ("search", 0)], 1)  # load every model
        allocator = bench.allocator_in(pid)
        say(f"soaking {base} for {args.duration:.0f} s (pid {pid}, {allocator} malloc)")
        start = time.monotonic()
        deadline = start + args.duration
        mix = bench.Load(base, images)
        hostile = Hostile(base, images)
        pings: list[float] = []
        plan = [("clip", 0), ("clip", 0), ("face", 0), ("face", 0), ("ocr", 0), ("search", 2.0)]
        threads = [
            threading.Thread(target=mix.stream, args=(task, deadline, k * 3, every))
            for k, (task, every) in enumerate(plan)
        ]
        threads += [
            threading.Thread(target=hostile.run, args=(deadline,)),
            threading.Thread(target=ping_probe, args=(base, deadline, pings)),
        ]
        for t in threads:
            t.start()
        rss: list[tuple[float, float]] = []
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - start, bench.rss_mb(pid)))
            if len(rss) % max(1, int(300 / args.sample)) == 0:
                say(f"  {rss[-1][0] / 60:5.1f} min: RSS {rss[-1][1]:.0f} MB, {sum(mix.done.values())} answered")
            time.sleep(args.sample)
        for t in threads:
            t.join()
        mix.seconds = args.duration
    steady = [(t, m) for t, m in rss if t >= args.warmup and t <= args.duration]
    window = max(1, int(300 / args.sample))
    finite = [p for p in pings if p != float("inf")]
    result = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "allocator": allocator,
        "rss_mb": {
            "at_warmup_end": steady[0][1] if steady else float("nan"),
            "first_5_min_after_warmup": statistics.mean(m for _, m in steady[:window]) if steady else float("nan"),
            "last_5_min": statistics.mean(m for _, m in steady[-window:]) if steady else float("nan"),
            "peak": max((m for _, m in rss), default=float("nan")),
            "slope_mb_per_hour": slope_mb_per_hour(steady),
            # a high-water mark that is still settling shows in the first half; a leak keeps growing in the second
            "slope_mb_per_hour_second_half": slope_mb_per_hour(steady[len(steady) // 2 :]),
            "per_5_min": [
                round(statistics.mean(m for _, m in steady[i : i + window])) for i in range(0, len(steady), window)
            ],
        },
        "mix": {task: mix.summary(task) for task in ("clip", "face", "ocr", "search")},
        "hostile": dict(sorted(hostile.statuses.items())),
        "hostile_5xx": sum(n for k, n in hostile.statuses.items() if k.rsplit(" ", 1)[-1].startswith("5")),
        "ping_ms": {
            "count": len(pings),
            "failed": len(pings) - len(finite),
            "p50": bench.percentile(finite, 50),
            "p99": bench.percentile(finite, 99),
            "max": max(finite, default=float("nan")),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


def print_report(r: dict) -> None:
    m = r["rss_mb"]
    minutes, warm = r["duration_s"] / 60, r["warmup_s"] / 60
    print(
        f"\nsoak: {minutes:.0f} minutes on {r['allocator']} malloc, "
        f"RSS trend measured after a {warm:.0f}-minute warm-up"
    )
    print(
        f"RSS: {m['first_5_min_after_warmup']:.0f} MB just after warm-up, {m['last_5_min']:.0f} MB in the last "
        f"5 minutes, peak {m['peak']:.0f} MB, trend {m['slope_mb_per_hour']:+.1f} MB/hour "
        f"({m['slope_mb_per_hour_second_half']:+.1f} MB/hour in the second half)"
    )
    print("RSS per 5 minutes after warm-up (MB): " + ", ".join(str(v) for v in m["per_5_min"]))
    print("\n| stream | answered | errors | p50 ms | p95 ms |\n|---|---|---|---|---|")
    for task, s in r["mix"].items():
        print(f"| {task} | {s['requests']} | {s['errors']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} |")
    print(f"\nhostile requests ({r['hostile_5xx']} answered 5xx):")
    for k, n in r["hostile"].items():
        print(f"  {n:5d}  {k}")
    p = r["ping_ms"]
    print(
        f"\n/ping: {p['count']} probes, {p['failed']} failed, "
        f"p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms"
    )


if __name__ == "__main__":
    raise SystemExit(main())
