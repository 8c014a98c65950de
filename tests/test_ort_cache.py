"""ONNX Runtime's optimised graphs kept beside the store: used when valid, never when stale, broken or half-written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from face_models import make_arcface

from immich_aio import ort_cache, ort_pack
from immich_aio.config import Settings
from immich_aio.sessions import SessionFactory

pytestmark = pytest.mark.packs  # every test here lets the cache write its copies (conftest turns that off elsewhere)

X = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)


def factory(store: Path, **env: str) -> SessionFactory:
    """Packed weights off unless asked: most tests here are about the optimised copy itself."""
    env = {"MACHINE_LEARNING_CACHE_FOLDER": str(store), "IMMICH_AIO_ORT_CACHE_PACKED": "false", **env}
    return SessionFactory(Settings.from_env(env))


def load(store: Path, model: Path, **env: str) -> ort.InferenceSession:
    """A session, and whatever the cache writes in the background for it finished (the copies are made by child
    processes, never while a request waits)."""
    f = factory(store, **env)
    session = f.create(model)
    assert f.ort_cache is not None and f.ort_cache.wait_written(180)
    return session


def run(session: ort.InferenceSession) -> np.ndarray:
    return session.run(None, {"input.1": X})[0]


def plain(path: Path) -> np.ndarray:
    return run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))


def entries(store: Path) -> list[Path]:
    return sorted(p for p in (store / ort_cache.FOLDER).glob("*/*") if not p.name.endswith(".partial"))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_arcface(tmp_path / "store" / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx")


def test_the_saved_graph_is_opened_next_time_and_answers_the_same(tmp_path, model):
    store = tmp_path / "store"
    first = load(store, model)
    [entry] = entries(store)
    assert {p.name for p in entry.iterdir()} == {
        ort_cache.GRAPH,
        ort_cache.WEIGHTS,
        ort_cache.READ_ORDER,
        ort_pack.REWRITES,
        ort_cache.ABOUT,
    }
    assert json.loads((entry / ort_pack.REWRITES).read_text()) == {"folded": 0, "why": "nothing to fold"}
    assert (entry / ort_cache.WEIGHTS).stat().st_size > 100_000  # the weights live outside the graph file
    assert first._model_path == str(model)  # the first load optimises the model's own file, and writes nothing
    again = factory(store).create(model)
    assert again._model_path == str(entry / ort_cache.GRAPH)
    reference = plain(model)
    for out in (run(first), run(again)):
        cos = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
        assert cos.min() >= 0.9999
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


def test_a_replaced_model_gets_a_new_entry_and_the_old_one_goes(tmp_path, model):
    store = tmp_path / "store"
    load(store, model)
    [old] = entries(store)
    staged = make_arcface(tmp_path / "new.onnx", seed=7)
    os.replace(staged, model)  # how an install lands: a rename
    session = load(store, model)
    [new] = entries(store)
    assert new != old and not old.exists()
    np.testing.assert_allclose(run(session), plain(model), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(factory(store).create(model)), plain(model), rtol=1e-4, atol=1e-5)


def test_an_unusable_entry_is_removed_and_the_model_loads_from_its_own_file(tmp_path, model, caplog):
    store = tmp_path / "store"
    load(store, model)
    [entry] = entries(store)
    (entry / ort_cache.WEIGHTS).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="immich_aio.ort_cache"):
        session = load(store, model)
    assert "unusable" in caplog.text and str(model) in caplog.text
    assert session._model_path == str(model)
    np.testing.assert_allclose(run(session), plain(model), rtol=1e-4, atol=1e-5)
    [rebuilt] = entries(store)  # and a good copy took its place
    assert factory(store).create(model)._model_path == str(rebuilt / ort_cache.GRAPH)


def test_a_half_written_entry_is_never_opened_and_an_old_one_is_cleared(tmp_path, model):
    store = tmp_path / "store"
    cache = ort_cache.OrtCache(store)
    providers = ["CPUExecutionProvider"]
    key = cache.key(model, providers)
    assert key is not None
    folder = cache.folder(model)
    young = folder / f".{key}.1.aaaa.partial"
    old = folder / f".{key}.2.bbbb.partial"
    for partial in (young, old):
        partial.mkdir(parents=True)
        (partial / ort_cache.GRAPH).write_bytes(b"not a graph")
    os.utime(old, (time.time() - 2 * ort_cache.STALE_PARTIAL_S,) * 2)
    session = load(store, model)
    assert session._model_path == str(model)
    assert [p.name for p in entries(store)] == [key]
    assert young.exists() and not old.exists()  # a writer may still be busy with the young one


def test_an_unwritable_or_full_store_serves_without_saving(tmp_path, model, monkeypatch):
    store = tmp_path / "store"
    (store / ort_cache.FOLDER).write_text("a file where the folder would go")
    np.testing.assert_allclose(run(load(store, model)), plain(model), rtol=1e-4, atol=1e-5)
    (store / ort_cache.FOLDER).unlink()
    monkeypatch.setattr(ort_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    np.testing.assert_allclose(run(load(store, model)), plain(model), rtol=1e-4, atol=1e-5)
    assert entries(store) == [] and list((store / ort_cache.FOLDER).rglob("*.partial")) == []


def test_a_bad_model_file_fails_with_its_own_error_and_leaves_nothing(tmp_path):
    store = tmp_path / "store"
    bad = store / "ocr" / "x" / "detection" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x08\x07 not onnx")
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|load"):
        factory(store).create(bad)
    assert entries(store) == [] and list((store / ort_cache.FOLDER).rglob("*.partial")) == []


def test_the_key_follows_runtime_providers_cpu_and_file(tmp_path, model, monkeypatch):
    cache = ort_cache.OrtCache(tmp_path / "store")
    cpu = ["CPUExecutionProvider"]
    key = cache.key(model, cpu)
    assert key == cache.key(model, cpu)
    assert cache.key(model, [("CUDAExecutionProvider", {"device_id": "0"}), *cpu]) != key
    monkeypatch.setattr(ort, "__version__", "0.0.1")
    assert cache.key(model, cpu) != key
    monkeypatch.undo()
    monkeypatch.setattr(ort_cache, "cpu_fingerprint", lambda: "another machine")
    assert cache.key(model, cpu) != key
    monkeypatch.undo()
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 1))
    assert cache.key(model, cpu) != key
    assert cache.key(tmp_path / "missing.onnx", cpu) is None


def test_concurrent_first_loads_make_one_entry(tmp_path, model):
    store = tmp_path / "store"
    barrier = threading.Barrier(3, timeout=30)
    results: list[object] = []
    factories = [factory(store) for _ in range(3)]  # three servers on one volume, each with its own cache

    def first_load(f: SessionFactory) -> None:
        barrier.wait()
        try:
            results.append(run(f.create(model)))
        except Exception as e:  # reported on the test's thread below
            results.append(e)

    threads = [threading.Thread(target=first_load, args=(f,)) for f in factories]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert all(f.ort_cache is not None and f.ort_cache.wait_written(180) for f in factories)
    reference = plain(model)
    assert len(results) == 3
    for out in results:
        assert isinstance(out, np.ndarray), out
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)
    assert len(entries(store)) == 1
    assert list((store / ort_cache.FOLDER).rglob("*.partial")) == []


def test_turned_off_nothing_is_written(tmp_path, model):
    store = tmp_path / "store"
    f = factory(store, IMMICH_AIO_ORT_CACHE="false")
    assert f.ort_cache is None
    f.create(model)
    assert not (store / ort_cache.FOLDER).exists()


def test_the_bundled_ocr_models_reopen_from_their_saved_graphs_and_run(tmp_path):
    """Every width bucket and batch the OCR recogniser sees, on the graph reopened from the cache, in a process of
    its own: saving ONNX Runtime's repacked weights too made exactly this crash (SIGSEGV) on reopening."""
    import subprocess
    import sys

    from immich_aio.models.ocr import bundled_model_dir

    code = f"""
import numpy as np
from pathlib import Path
from immich_aio.config import Settings
from immich_aio.sessions import SessionFactory
store = Path({str(tmp_path / "store")!r})
for start in ("saves", "reopens"):
    f = SessionFactory(Settings.from_env({{"MACHINE_LEARNING_CACHE_FOLDER": str(store)}}))
    for name, shapes in (("PP-OCRv6_rec_small.onnx", [(b, 3, 48, w) for w in (320, 160, 960, 480) for b in (1, 5)]),
                         ("PP-OCRv6_det_small.onnx", [(1, 3, 736, 544), (1, 3, 320, 960)])):
        s = f.create(Path({str(bundled_model_dir())!r}) / name)
        assert (".ort-cache" in s._model_path) == (start == "reopens"), s._model_path
        for shape in shapes:
            s.run(None, {{s.get_inputs()[0].name: np.zeros(shape, np.float32)}})
    assert f.ort_cache.wait_written(120)  # the copies are written in the background
print("ran")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "ran" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_copies_of_model_files_that_are_gone_are_swept_at_start(tmp_path, model):
    from conftest import settings_for
    from starlette.testclient import TestClient

    from immich_aio.app import create_app

    store = tmp_path / "store"
    other = make_arcface(store / "facial-recognition" / "antelopev2" / "recognition" / "model.onnx", seed=3)
    f = factory(store)
    f.create(model)
    f.create(other)
    assert f.ort_cache is not None and f.ort_cache.wait_written(180)
    assert len(entries(store)) == 2
    junk = store / ort_cache.FOLDER / "0123456789abcdef" / "somekey"
    junk.mkdir(parents=True)
    (junk / ort_cache.ABOUT).write_text("not json")  # unreadable: left alone
    shutil.rmtree(other.parents[1])  # the user removed that pack
    with TestClient(create_app(settings_for(store))):
        pass
    [kept] = [e for e in entries(store) if e.parent.name != "0123456789abcdef"]
    assert kept.parent == f.ort_cache.folder(model)
    assert junk.exists()


def packing(store: Path) -> SessionFactory:
    return factory(store, IMMICH_AIO_ORT_CACHE_PACKED="true")


def test_a_checked_packed_copy_is_used_from_the_next_load(tmp_path, model):
    """Issue 19: after the first load from an entry, a child process saves the weights as the CPU kernels pack them
    and checks that copy; the next load opens it and answers the same."""
    store = tmp_path / "store"
    f = packing(store)
    first = f.create(model)  # makes the entry: the model's own file, optimised
    assert f.ort_cache is not None and f.ort_cache.wait_written(180)
    [entry] = entries(store)
    packed = entry / ort_cache.PACKED
    assert {p.name for p in packed.iterdir()} == {
        ort_cache.GRAPH,
        ort_cache.WEIGHTS,
        ort_cache.READ_ORDER,
        ort_pack.REWRITES,
    }
    assert not (entry / ort_cache.NOT_PACKED).exists() and not list(entry.glob(".*.partial"))
    again = packing(store).create(model)
    assert again._model_path == str(packed / ort_cache.GRAPH)
    reference = plain(model)
    for out in (run(first), run(again)):
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)
    assert packing(store).ort_cache.wait_written(0)  # nothing more to do for it: no second child


def _fake_packer(monkeypatch, code: str) -> list[list[str]]:
    """Replace the packing child with `code` (argv: pack SOURCE FOLDER ENTRY; the optimised copy is still made by
    the real one); returns the arguments of each packing child started."""
    import subprocess
    import sys

    started: list[list[str]] = []
    real = subprocess.Popen

    def popen(args, **kw):
        if args[len(ort_cache.PACKER)] == "pack":
            started.append(list(args[len(ort_cache.PACKER) :]))
        return real(args, **kw)

    real_child = "runpy.run_module('immich_aio.ort_pack', run_name='__main__')"
    wrapped = f"import runpy, sys\nif sys.argv[1] == 'entry':\n    {real_child}\n"
    monkeypatch.setattr(ort_cache, "PACKER", (sys.executable, "-c", wrapped + code))
    monkeypatch.setattr(ort_cache.subprocess, "Popen", popen)
    return started


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import os; os.abort()", "crashed (signal 6)"),
        ("import sys; print('not packed: its outputs differ at batch 2', file=sys.stderr); sys.exit(3)", "differ"),
        # it wrote a packed copy and then crashed: still never used
        ("import sys, pathlib, os; f = pathlib.Path(sys.argv[3]); (f / 'model.onnx').write_bytes(b'x'); os.abort()",
         "crashed"),
    ],
)  # fmt: skip
def test_a_packed_copy_that_crashed_or_disagreed_is_never_used_nor_tried_again(tmp_path, model, monkeypatch, caplog,
                                                                             code, reason):  # fmt: skip
    store = tmp_path / "store"
    started = _fake_packer(monkeypatch, code)
    f = packing(store)
    with caplog.at_level(logging.WARNING, logger="immich_aio.ort_cache"):
        f.create(model)
        assert f.ort_cache is not None and f.ort_cache.wait_written(60)
    [entry] = entries(store)
    assert not (entry / ort_cache.PACKED).exists() and not list(entry.glob(".*.partial"))
    assert reason in (entry / ort_cache.NOT_PACKED).read_text()
    assert "Not keeping packed weights" in caplog.text and reason in caplog.text
    again = packing(store)
    session = again.create(model)
    assert session._model_path == str(entry / ort_cache.GRAPH)
    assert again.ort_cache.wait_written(60)
    assert len(started) == 1  # the verdict stands: no second child for the same entry
    assert started[0][-1] == str(entry)  # whose REWRITES says which graph to pack (ort_pack.entry_said)
    np.testing.assert_allclose(run(session), plain(model), rtol=1e-4, atol=1e-5)


def test_a_packed_copy_that_will_not_open_is_removed_and_noted(tmp_path, model, caplog):
    store = tmp_path / "store"
    f = packing(store)
    f.create(model)
    assert f.ort_cache is not None and f.ort_cache.wait_written(180)
    [entry] = entries(store)
    (entry / ort_cache.PACKED / ort_cache.WEIGHTS).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="immich_aio.ort_cache"):
        session = packing(store).create(model)
    assert "unusable" in caplog.text
    assert session._model_path == str(entry / ort_cache.GRAPH)
    assert not (entry / ort_cache.PACKED).exists() and (entry / ort_cache.NOT_PACKED).is_file()
    np.testing.assert_allclose(run(session), plain(model), rtol=1e-4, atol=1e-5)


def test_models_with_free_image_sizes_are_not_packed(tmp_path, monkeypatch):
    """OCR and face detection take any image size: the child could not run every shape the server will, so they
    are never packed (the PP-OCRv6 recogniser's packed copy is the one that crashed)."""
    from immich_aio.models.ocr import bundled_model_dir

    started = _fake_packer(monkeypatch, "raise SystemExit(0)")
    store = tmp_path / "store"
    for name in ("PP-OCRv6_rec_small.onnx", "PP-OCRv6_det_small.onnx"):
        source = store / "ocr" / "PP-OCRv6_small" / name
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundled_model_dir() / name, source)
        for _ in range(2):
            packing(store).create(source)
    assert started == []
    assert not list((store / ort_cache.FOLDER).rglob(ort_cache.PACKED))


def test_packing_stops_with_the_server(tmp_path, model, monkeypatch):
    """A child still packing when the server stops is killed; it leaves no verdict and no temporary folder."""
    started = _fake_packer(monkeypatch, "import time; time.sleep(120)")
    f = packing(tmp_path / "store")
    f.create(model)
    assert f.ort_cache is not None
    conftest_wait = __import__("conftest").wait_for
    conftest_wait(lambda: len(started) == 1, "the packing child started", seconds=60)
    f.ort_cache.close()
    assert f.ort_cache.wait_written(30)
    [entry] = entries(tmp_path / "store")
    assert len(started) == 1
    assert not (entry / ort_cache.NOT_PACKED).exists() and not list(entry.glob(".*.partial"))
    assert not (entry / ort_cache.PACKED).exists()


def test_the_packing_child_refuses_a_model_with_free_image_sizes(tmp_path):
    """The child's own guard, should it ever be handed such a model: exit 3, and the parent keeps nothing."""
    from immich_aio import ort_pack
    from immich_aio.models.ocr import bundled_model_dir

    folder = tmp_path / "packed"
    folder.mkdir()
    assert (
        ort_pack.main(["pack", str(bundled_model_dir() / "PP-OCRv6_det_small.onnx"), str(folder)])
        == ort_pack.EXIT_DISAGREES
    )


def test_the_packing_child_refuses_a_copy_that_answers_differently(tmp_path, model, monkeypatch):
    """Its check compares the reopened copy with the session it was made from, at every batch size it tries."""
    from immich_aio import ort_pack

    real = ort.InferenceSession
    sessions: list[ort.InferenceSession] = []

    class Skewed(real):  # type: ignore[misc,valid-type]
        """The second session the child makes is the reopened copy: its answers are made slightly off."""

        def run(self, *args, **kw):
            out = super().run(*args, **kw)
            return [o + 1e-3 for o in out] if self is sessions[1] else out

    def session(*args, **kw):
        sessions.append(Skewed(*args, **kw))
        return sessions[-1]

    monkeypatch.setattr(ort_pack.ort, "InferenceSession", session)
    assert ort_pack.main(["pack", str(model), str(tmp_path)]) == ort_pack.EXIT_DISAGREES
    monkeypatch.undo()
    assert ort_pack.main(["pack", str(model), str(tmp_path)]) == 0  # unskewed, the same model passes


def test_packing_waits_until_the_server_is_quiet(tmp_path, model, monkeypatch):
    """Writing the copies beside the first requests after a start slowed them (a packing child made the first face
    request 0.3 s slower; saving the optimised copy on the request's path made a first request 28 s on a busy
    disk): the children start only once the server has settled, one at a time."""
    log = tmp_path / "children.log"
    write = f"w = lambda s: open({str(log)!r}, 'a').write(s + chr(10))"
    child = f"import time; {write}; w('start'); time.sleep(0.5); w('end')"
    started = _fake_packer(monkeypatch, child)
    store = tmp_path / "store"
    other = make_arcface(store / "facial-recognition" / "antelopev2" / "recognition" / "model.onnx", seed=5)
    f = packing(store)
    assert f.ort_cache is not None
    settled = threading.Event()  # the runtime's: set while nothing is in flight
    f.ort_cache.quiet = settled
    f.create(model)
    f.create(other)
    time.sleep(1.5)  # the threads are waiting: nothing may be written while requests are in flight
    assert started == [] and not f.ort_cache.wait_written(0)
    assert entries(store) == [] and not list((store / ort_cache.FOLDER).rglob("*.partial"))
    settled.set()
    assert f.ort_cache.wait_written(60)
    assert len(started) == 2
    assert log.read_text().split() == ["start", "end", "start", "end"]  # one after the other


Advice = tuple[str, int, int, int]  # (the file it names, offset, length, advice)


def _advised(monkeypatch) -> list[Advice]:
    """Every read-ahead asked of the kernel."""
    calls: list[Advice] = []
    real = os.posix_fadvise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    return calls


def _asked(calls: list[Advice], thread: threading.Thread | None = None) -> list[tuple[str, int, int]]:
    """Once the read-ahead `thread` (default: every read-ahead thread) has ended: what it asked for, checked here,
    in the test's thread, to be read-aheads only."""
    threads = [thread] if thread is not None else [t for t in threading.enumerate() if t.name == "read-ahead"]
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert {advice for *_, advice in calls} <= {os.POSIX_FADV_WILLNEED}
    return [(path, offset, length) for path, offset, length, _ in calls]


def _advised_by(thread: threading.Thread | None, calls: list[Advice]) -> list[tuple[int, int]]:
    assert thread is not None
    return [(offset, length) for _, offset, length in _asked(calls, thread)]


def test_a_saved_copy_is_read_ahead_as_it_is_opened(tmp_path, model, monkeypatch):
    """The copy being opened is the one read ahead, in a thread of its own while ONNX Runtime builds the session."""
    store = tmp_path / "store"
    load(store, model, IMMICH_AIO_ORT_CACHE_PACKED="true")
    [entry] = entries(store)
    asked: list[Path] = []
    real = ort_cache.read_ahead
    monkeypatch.setattr(ort_cache, "read_ahead", lambda saved: (asked.append(saved), real(saved))[1])
    session = packing(store).create(model)
    assert session._model_path == str(entry / ort_cache.PACKED / ort_cache.GRAPH)
    assert asked == [entry / ort_cache.PACKED]


def test_a_packed_copy_is_asked_for_in_the_order_a_session_reads_it(tmp_path, model, monkeypatch):
    """Issue 19, first requests from a paged-out disk: a session build reads every initializer as stored, its first
    run the packed weights, which lie in between; asked for as one file, the packed weights held up the build (a
    ViT-B/16: 0.83 s, against 0.62 s in this order). The read order written with the copy puts every stored
    initializer before every packed weight, within the file, each range once; the thread asks for them in that order
    in pieces, then for the whole file."""
    store = tmp_path / "store"
    load(store, model, IMMICH_AIO_ORT_CACHE_PACKED="true")
    [entry] = entries(store)
    packed = entry / ort_cache.PACKED
    size = (packed / ort_cache.WEIGHTS).stat().st_size
    order = json.loads((packed / ort_cache.READ_ORDER).read_text())
    graph = onnx.load(str(packed / ort_cache.GRAPH), load_external_data=False)
    stored = {(int(e["offset"]), int(e["length"])) for e in _external(graph)}
    packs = [r for r in map(tuple, order) if r not in stored]
    assert stored and packs  # the test model has both kinds, or the order would prove nothing
    assert [tuple(r) for r in order] == sorted(stored) + sorted(packs)  # every stored one first
    assert len(set(map(tuple, order))) == len(order) and all(o >= 0 and o + n <= size for o, n in order)
    monkeypatch.setattr(ort_cache, "READ_AHEAD_PIECE", 64 << 10)  # smaller than the test model's larger ranges
    assert max(n for _, n in order) > ort_cache.READ_AHEAD_PIECE
    calls = _advised(monkeypatch)
    asked = _advised_by(ort_cache.read_ahead(packed), calls)
    assert asked[-1] == (0, 0)  # and then the whole file
    pieces = asked[:-1]
    assert all(0 < n <= ort_cache.READ_AHEAD_PIECE for _, n in pieces)
    regrouped, it = [], iter(pieces)
    for offset, length in order:  # the pieces, joined again, are the read order's ranges, in its order
        covered = 0
        while covered < length:
            piece_offset, piece_length = next(it)
            assert piece_offset == offset + covered
            covered += piece_length
        regrouped.append([offset, covered])
    assert regrouped == order and next(it, None) is None
    # the unpacked copy's order is its stored initializers, as its session reads them
    plain_order = json.loads((entry / ort_cache.READ_ORDER).read_text())
    unpacked = onnx.load(str(entry / ort_cache.GRAPH), load_external_data=False)
    assert [tuple(r) for r in plain_order] == sorted((int(e["offset"]), int(e["length"])) for e in _external(unpacked))


@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_models_own_file_is_read_ahead_whole_as_it_is_loaded(tmp_path, model, monkeypatch, cache):
    """Issue 19, a first start on files from a paged-out disk: ONNX Runtime reads a model file in small reads, each
    waiting for the disk (a ViT-B/16 loaded and ran once in 1.9 s, 1.2 s with its file asked for first). With no
    copy yet, and with the cache off, the file the session is built from is asked for whole, and nothing else."""
    store = tmp_path / "store"
    calls = _advised(monkeypatch)
    factory(store, IMMICH_AIO_ORT_CACHE=cache).create(model)
    assert _asked(calls) == [(str(model), 0, 0)]


def test_a_read_ahead_of_something_other_than_a_file_asks_nothing_and_ends(tmp_path, monkeypatch):
    """A FIFO (or a folder) where a model file should be: opening a FIFO to read waits for a writer, which would hold
    the read-ahead thread for good; it ends at once and asks the kernel for nothing."""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    calls = _advised(monkeypatch)
    for path in (fifo, tmp_path):
        assert _advised_by(ort_cache.read_ahead_file(path), calls) == []


def test_a_model_with_a_copy_reads_ahead_the_copy_not_its_own_file(tmp_path, model, monkeypatch):
    """Both would compete for the disk: only the file the session opens is asked for."""
    store = tmp_path / "store"
    load(store, model)
    [entry] = entries(store)
    calls = _advised(monkeypatch)
    assert factory(store).create(model)._model_path == str(entry / ort_cache.GRAPH)
    asked = _asked(calls)
    assert asked and {path for path, *_ in asked} == {str(entry / ort_cache.WEIGHTS)}


def _external(graph: onnx.ModelProto) -> list[dict[str, str]]:
    return [
        {e.key: e.value for e in t.external_data}
        for t in graph.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


@pytest.mark.parametrize(
    "damage",
    [
        "missing",
        "not json",
        "[[0, 4096], [4096]]",
        '[[0, "4096"]]',
        "[[-1, 10]]",
        "[[0, 0]]",
        "beyond",
        "too long",
        "huge",
        '{"0": 1}',
    ],
)
def test_a_copy_without_a_usable_read_order_is_read_ahead_whole(tmp_path, model, monkeypatch, damage):
    """A copy saved before read orders existed, or one whose order is damaged or does not fit its weights file, is
    still read ahead: as one whole file, and nothing outside it is asked for."""
    store = tmp_path / "store"
    load(store, model)
    [entry] = entries(store)
    size = (entry / ort_cache.WEIGHTS).stat().st_size
    order = entry / ort_cache.READ_ORDER
    if damage == "missing":
        order.unlink()
    elif damage == "beyond":
        order.write_text(json.dumps([[0, 4096], [size - 10, 20]]))
    elif damage == "too long":
        order.write_text(json.dumps([[0, 1]] * (ort_cache.MAX_READ_ORDER + 1)))
    elif damage == "huge":
        order.write_text("[" + " " * (ort_cache.MAX_READ_ORDER * 64) + "[0, 1]]")
    else:
        order.write_text(damage)
    calls = _advised(monkeypatch)
    assert _advised_by(ort_cache.read_ahead(entry), calls) == [(0, 0)]
    calls.clear()
    assert _advised_by(ort_cache.read_ahead(tmp_path / "missing"), calls) == []  # nothing to read: no error of its own
