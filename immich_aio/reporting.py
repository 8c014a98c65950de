"""What a running server says about itself: the startup banner, `/info`, and the live gauges of `/metrics`.

Read-only views over the runtime, kept apart from it so that owning the server (runtime.py) and describing it
change for different reasons.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict

import onnxruntime as ort
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from immich_aio import __version__, memory, priority
from immich_aio.runtime import Runtime
from immich_aio.store import TASKS

FETCH_RULE = (
    "A name with no model is fetched on its first request (IMMICH_AIO_AUTO_FETCH): a CLIP name gets the "
    "Chinese-CLIP of its dimension from a ready ONNX export (512-d CN-CLIP ViT-B-16, 768-d ViT-L-14), any other "
    "dimension or IMMICH_AIO_AUTO_FETCH_CLIP=immich gets Immich's own model for the name; a face pack comes from "
    "immich-app/<pack>; an OCR name for a script the bundled model cannot read gets its own PP-OCRv5 files. A name "
    "whose files exist is never answered by a fetched other model."
)
IMMICH_DEFAULTS = {"ViT-B-32__openai", "buffalo_l", "PP-OCRv5_mobile"}  # what Immich sends unless told otherwise


class LoadedModelInfo(TypedDict):
    """One loaded model in `/info`."""

    task: str
    type: str
    name: str
    answersTo: list[str]
    files: dict[str, dict[str, object]]
    providers: list[str]
    preloaded: bool
    ttlSeconds: float
    recentBatchSizes: list[int]
    narrowSession: bool  # its second session, on fewer threads, for runs under a backlog, is made


class ThreadsInfo(TypedDict):
    intraOp: int
    concurrentRuns: int
    splitRuns: bool  # under a backlog, two runs of `narrowThreads` each share a slot (IMMICH_AIO_SPLIT_RUNS)
    narrowThreads: int
    requestThreads: int
    maxBatch: int
    decodeBudgetMegapixels: float
    ocrOnCpu: bool  # OCR's runs on the CPU of a GPU host, `ocrRuns` at once (IMMICH_AIO_OCR_DEVICE)
    ocrRuns: int
    searchNice: int | None  # the nice value of the threads that serve a search (the server's own)
    backgroundNice: int | None  # of the threads that do background work; null: as a search's (priority.py)


class AutoFetchInfo(TypedDict):
    enabled: bool
    clip: str
    waitSeconds: dict[str, float]
    rule: str


class Info(TypedDict):
    """The `/info` body."""

    version: str
    onnxruntime: str
    providers: list[str]
    openvinoDevice: str | None  # the device OpenVINO runs on when it is a provider (`openvino` extra)
    allocator: str
    threads: ThreadsInfo
    modelStore: str
    models: list[LoadedModelInfo]
    aliases: dict[str, dict[str, str]]
    answers: dict[str, dict[str, dict[str, str]]]
    servedFiles: dict[str, dict[str, dict[str, dict[str, object]]]]
    skippedStoreEntries: dict[str, str]
    autoFetch: AutoFetchInfo
    downloads: list[dict[str, Any]]
    admission: dict[str, Any]
    modelRevision: str


def watch(rt: Runtime) -> None:
    """Put the runtime's live gauges on its `/metrics`."""
    rt.metrics.watch(lambda: live_gauges(rt))


def live_gauges(rt: Runtime) -> Iterable[Metric]:
    """What is waiting right now, read when /metrics is scraped."""
    queued = GaugeMetricFamily("immich_aio_queue_depth", "Items waiting for a batched run", labels=["model"])
    loaded = GaugeMetricFamily("immich_aio_models_loaded", "Models loaded now", labels=["task", "type"])
    counts: dict[tuple[str, str], int] = {}
    for entry in rt.registry.loaded():
        model = entry.model
        counts[(model.task, model.type)] = counts.get((model.task, model.type), 0) + 1
        if model.batcher is not None:
            queued.add_metric([model.batcher.name], model.batcher.depth)
    for (task, type_), n in sorted(counts.items()):
        loaded.add_metric([task, type_], n)
    yield queued
    yield loaded
    yield GaugeMetricFamily(
        "immich_aio_run_gate_waiting", "Background runs waiting for a slot", value=rt.factory.gate.waiting
    )
    runs = CounterMetricFamily(
        "immich_aio_runs_granted",
        "Background runs granted, by width (narrow: half a slot, under a backlog)",
        labels=["width"],
    )
    runs.add_metric(["wide"], rt.factory.gate.wide_grants)
    runs.add_metric(["narrow"], rt.factory.gate.narrow_grants)
    yield runs
    yield GaugeMetricFamily("immich_aio_requests_in_flight", "Requests admitted and not answered", value=len(rt.jobs))
    yield GaugeMetricFamily(
        "immich_aio_decode_budget_pixels_used",
        "Decoded pixels held now (IMMICH_AIO_DECODE_BUDGET_MP)",
        value=rt.budget.used,
    )
    yield GaugeMetricFamily(
        "immich_aio_decode_budget_waiting", "Requests waiting for the decode budget", value=rt.budget.waiting
    )


def _priorities() -> str:
    search, background = priority.levels()
    if background is None:
        return "background work at a search's CPU priority"
    return f"background work at nice {background}, searches at {search} (IMMICH_AIO_BACKGROUND_NICE)"


def banner(rt: Runtime) -> str:
    """The one startup summary: version, providers, store, thread budget, and who answers what."""
    f = rt.factory
    allocator = memory.active()
    hint = (
        " (install libjemalloc2 for a smaller footprint: README, 'Memory and runtime settings')"
        if allocator == "glibc" and rt.settings.allocator == "auto"
        else ""
    )
    lines = [
        f"immich-aio {__version__} on ONNX Runtime {ort.__version__}, providers {', '.join(f.providers)}"
        + (f" (OpenVINO on {f.openvino_device}, {rt.settings.openvino_precision})" if f.openvino_device else ""),
        f"  model store {rt.store.root}; memory allocator {allocator}{hint}",
        f"  threads: {f.intra_threads} per run, {f.gate.slots} concurrent runs"
        f"{f' (under a backlog {f.gate.runs} runs of {f.narrow_threads})' if f.split else ''}"
        f"{' (+1 for OCR)' if f.short_lane and not f.ocr_on_cpu else ''}, "
        f"{rt.settings.request_threads} request threads; batches up to {f.batch_size}; "
        f"decode budget {rt.budget.total / 1e6:g} MP; {_priorities()}",
    ]
    if f.ocr_on_cpu:
        lines.append(
            f"  OCR on the CPU: {f.cpu_threads} threads per run, {f.gate_for(True).slots} runs at once, beside the "
            "GPU's (IMMICH_AIO_OCR_DEVICE=gpu runs it on the GPU: README, 'GPU hosts (NVIDIA)')"
        )
    for task, resolver in rt.registry.resolvers.items():
        by_model: dict[tuple[str, str], set[str]] = {}
        for name, entry in resolver.explain().items():
            key = (entry["servedBy"], entry["why"])
            by_model.setdefault(key, set()).add(name.split(" (")[0])  # OCR lists each type
        if not by_model:
            fetched = "; fetched on the first request for it" if rt.fetcher.enabled else ""
            lines.append(f"  {task}: no model installed{fetched}")
        for (served, why), names in sorted(by_model.items()):
            ordered = sorted(names, key=lambda n: (n not in IMMICH_DEFAULTS, n))
            shown = ", ".join(ordered[:4]) + (f" and {len(ordered) - 4} more (see /info)" if len(ordered) > 4 else "")
            lines.append(f"  {task}: {served} answers {shown}" + (f" ({why})" if why else ""))
    for skipped, reason in sorted(rt.store.skipped().items()):
        lines.append(f"  skipped {skipped}: {reason}")
    return "\n".join(lines)


def _served_files(rt: Runtime) -> dict[str, dict[str, dict[str, dict[str, object]]]]:
    """For every model that answers an alias, its files with size and sha256 as on disk now (loaded or not)."""
    out: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
    for task, resolver in rt.registry.resolvers.items():
        for served in sorted(set(resolver.aliases().values())):
            files = {}
            for role, path in resolver.files(served).items():
                try:
                    files[str(role)] = rt.store.describe(path).as_dict()
                except OSError as e:
                    files[str(role)] = {"path": str(path), "error": f"unreadable: {e.strerror or e}"}
            if files:
                out.setdefault(task.value, {})[served] = files
    return out


def info(rt: Runtime) -> Info:
    """The `/info` body (blocking: it stats and may hash files; run it on a worker)."""
    for task in TASKS:
        rt.store.names(task)  # notices (and logs once) any bad entry in the store
    models: list[LoadedModelInfo] = []
    for entry in rt.registry.loaded():
        spec, model = entry.spec, entry.model
        models.append(
            {
                "task": spec.task,
                "type": spec.type,
                "name": spec.name,
                "answersTo": sorted(entry.requested),
                "files": {role: file.as_dict() for role, file in entry.files.items()},
                "providers": model.providers(),
                "preloaded": entry.pinned,
                "ttlSeconds": rt.registry.ttl(spec.task, spec.type),
                "recentBatchSizes": list(model.batcher.batch_sizes)[-20:] if model.batcher else [],
                "narrowSession": model.narrow is not None,
            }
        )
    search_nice, background_nice = priority.levels()
    return {
        "version": __version__,
        "onnxruntime": ort.__version__,
        "providers": rt.factory.providers,
        "openvinoDevice": rt.factory.openvino_device,
        "allocator": memory.active(),
        "threads": {
            "intraOp": rt.factory.intra_threads,
            "concurrentRuns": rt.factory.gate.slots,
            "splitRuns": rt.factory.split,
            "narrowThreads": rt.factory.narrow_threads,
            "requestThreads": rt.settings.request_threads,
            "maxBatch": rt.factory.batch_size,
            "decodeBudgetMegapixels": rt.budget.total / 1e6,
            "ocrOnCpu": rt.factory.ocr_on_cpu,
            "ocrRuns": rt.factory.gate_for(True).slots,
            "searchNice": search_nice,
            "backgroundNice": background_nice,
        },
        "modelStore": str(rt.store.root),
        "models": sorted(models, key=lambda m: (m["task"], m["type"], m["name"])),
        "aliases": {task.value: r.aliases() for task, r in rt.registry.resolvers.items()},
        "answers": {task.value: r.explain() for task, r in rt.registry.resolvers.items()},
        "servedFiles": _served_files(rt),
        "skippedStoreEntries": rt.store.skipped(),
        "autoFetch": {
            "enabled": rt.fetcher.enabled,
            "clip": rt.settings.auto_fetch_clip,
            "waitSeconds": {"image": rt.settings.fetch_wait_s, "text": rt.settings.fetch_wait_text_s},
            "rule": FETCH_RULE,
        },
        "downloads": rt.fetcher.downloads(),
        "admission": rt.admission.describe(),
        "modelRevision": rt.settings.model_revision,
    }
