"""Prometheus metrics (`GET /metrics`), with prometheus_client.

Label values are bounded: tasks, types and endpoints come from fixed lists, models are served model
names (folders in the store or built-ins), never names a client sent, so no request can create series.
Gauges that describe the moment (queue depths, the decode budget) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from immich_aio.tasks import TASK_TYPES, Task

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENDPOINTS = ("/predict", "/check", "/ocr", "/clip/img", "/clip/txt", "/represent", "/restart", "/restart_v2")


def task_label(task: str | None) -> str:
    return task if task in TASK_TYPES else "-"


def type_label(task: str | None, type_: str | None) -> str:
    return type_ if task in TASK_TYPES and type_ in TASK_TYPES[Task(task)] else "-"


def endpoint_label(endpoint: str) -> str:
    return endpoint if endpoint in ENDPOINTS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        r = self.registry
        self.requests = Counter(
            "immich_aio_requests",
            "Inference requests answered, one count per entry (task and type), by the model that served it",
            ["endpoint", "task", "type", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "immich_aio_request_seconds",
            "Time from admission to answer of inference requests",
            ["endpoint", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "immich_aio_batch_size",
            "Items per ONNX Runtime run of a batched model",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.gate_wait = Histogram(
            "immich_aio_run_gate_wait_seconds",
            "Time a background run waited for one of the concurrent-run slots",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.model_events = Counter(
            "immich_aio_model_events",
            "Model loads, unloads (TTL, reinstall, request) and load failures",
            ["event", "task", "type", "model"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "immich_aio_model_load_seconds",
            "Time to load a model",
            ["task", "type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.downloads = Counter(
            "immich_aio_model_downloads",
            "Downloads of missing models on first use, by outcome (started, installed, failed)",
            ["task", "outcome"],
            registry=r,
        )
        self.download_bytes = Counter(
            "immich_aio_model_download_bytes",
            "Bytes fetched by downloads on first use (finished attempts, resumed ones count what they fetched)",
            ["task"],
            registry=r,
        )

    def download_event(self, outcome: str, plan: object, nbytes: int) -> None:
        task = task_label(getattr(plan, "task", None))
        self.downloads.labels(task, outcome).inc()
        if nbytes:
            self.download_bytes.labels(task).inc(nbytes)

    def watch(self, sample: Callable[[], Iterable[Metric]]) -> None:
        """Register figures computed when scraped (queue depths, budget, loaded models, runs by width)."""

        class Live:
            def collect(self) -> Iterable[Metric]:
                return sample()

        self.registry.register(Live())

    def model_event(self, event: str, key: tuple[str, str, str], seconds: float) -> None:
        task, type_, model = key
        self.model_events.labels(event, task_label(task), type_label(task, type_), model).inc()
        if event == "loaded":
            self.load_seconds.labels(task_label(task), type_label(task, type_)).observe(seconds)

    def batch_observer(self, model: str) -> Callable[[int], None]:
        histogram = self.batch_size.labels(model)
        return histogram.observe

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
