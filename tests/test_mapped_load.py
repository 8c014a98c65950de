"""A model's own file loaded with its packable weights mapped where they lie: the same answers, no mapping left
behind, and the usual load wherever that cannot be promised."""

from __future__ import annotations

import logging
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from immich_aio import mapped_load, ort_cache
from immich_aio.onnx_walk import fields, varint

CPU = ["CPUExecutionProvider"]
X = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
IMG = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
IDS = np.array([[1, 5, 999]], dtype=np.int64)
PACKED = {"w_matmul", "w_gemm", "w_conv"}  # each used only where the CPU kernels pack it


def make_model(path: Path, seed: int = 0) -> Path:
    """MatMul, Gemm and Conv weights (packed by the CPU kernels), beside weights that are not packed: a Gather table,
    a bias over the size limit, a weight used by a MatMul and an Add, and a small one."""
    rng = np.random.default_rng(seed)

    def const(name: str, shape: tuple[int, ...]) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        const("w_matmul", (256, 512)),
        const("bias_big", (512,)),  # 2 KB: under the size limit
        const("w_gemm", (512, 1024)),
        const("b_gemm", (1024,)),
        const("w_shared", (1024, 1024)),  # a MatMul's and an Add's: not packable
        const("w_conv", (64, 3, 3, 3)),
        const("table", (1000, 64)),  # a Gather's
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_matmul"], ["m"]),
        helper.make_node("Add", ["m", "bias_big"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Gemm", ["r", "w_gemm", "b_gemm"], ["g"]),
        helper.make_node("MatMul", ["g", "w_shared"], ["s"]),
        helper.make_node("Add", ["s", "s"], ["s2"]),
        helper.make_node("Slice", ["w_shared", "zero", "one"], ["row"]),  # w_shared also used outside a MatMul
        helper.make_node("Add", ["s2", "row"], ["y"]),
        helper.make_node("Conv", ["img", "w_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["table", "ids"], ["e"]),
    ]
    inits += [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "mapped",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 16, 16]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 64, 16, 16]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3, 64]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    return opts


def answers(session: ort.InferenceSession) -> list[np.ndarray]:
    return session.run(None, {"x": X, "img": IMG, "ids": IDS})


def usual(path: Path) -> list[np.ndarray]:
    return answers(ort.InferenceSession(str(path), options(), providers=CPU))


@pytest.fixture(autouse=True)
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapped_load, "MIN_FILE_BYTES", 0)  # the test models are small


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "store" / "clip" / "m" / "visual" / "model.onnx")


def external(graph: bytes) -> set[str]:
    return {t.name for t in onnx.load_from_string(graph).graph.initializer if t.data_location == TensorProto.EXTERNAL}


def test_packable_weights_are_read_from_the_file_and_the_answers_are_the_same(model, caplog):
    caplog.set_level(logging.DEBUG, logger="immich_aio.mapped_load")
    session = mapped_load.session(model, options, CPU)
    assert session is not None
    for got, want in zip(answers(session), usual(model), strict=True):
        assert np.array_equal(got, want)
    assert "packed from the file, not copied" in caplog.text
    with model.open("rb") as f:
        graph, mapped = mapped_load.graph_with_mapped_weights(f.read(), model.name)
    assert external(graph) == PACKED
    assert mapped == (256 * 512 + 512 * 1024 + 64 * 3 * 3 * 3) * 4


def test_no_mapping_of_the_file_is_left_once_the_session_is_built(model):
    session = mapped_load.session(model, options, CPU)
    assert session is not None
    assert mapped_load.mappings_of(_identity(model), model.name) == 0
    # the check itself sees a mapping of the file when there is one
    import mmap

    with model.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as held:
        held[0]
        assert mapped_load.mappings_of(_identity(model), model.name) == 1


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def test_the_graph_keeps_every_other_field_and_its_data_is_the_files(model):
    """Read back with its external data, the rewritten graph is the model as written."""
    original = onnx.load(model)
    with model.open("rb") as f:
        graph, _ = mapped_load.graph_with_mapped_weights(f.read(), model.name)
    rewritten = onnx.load_from_string(graph)
    onnx.external_data_helper.load_external_data_for_model(rewritten, str(model.parent))
    for tensor in rewritten.graph.initializer:
        tensor.ClearField("data_location")  # the loader sets it to DEFAULT, which the original leaves unset
    assert rewritten == original


def test_a_weight_onnx_runtime_keeps_mapped_is_loaded_by_copy_instead(model, monkeypatch, caplog):
    """A weight whose mapping stays with the session (here a Gather's table, if it were mapped) would tie the running
    server to the user's file: such a session is dropped."""
    caplog.set_level(logging.INFO, logger="immich_aio.mapped_load")
    monkeypatch.setattr(mapped_load, "PACKED_INPUT", {**mapped_load.PACKED_INPUT, b"Gather": 0})
    assert mapped_load.session(model, options, CPU) is None
    assert "kept 1 of its weights mapped from the file; loading it by copy" in caplog.text
    assert mapped_load.mappings_of(_identity(model), model.name) == 0  # the dropped session's mapping went with it


def test_a_file_replaced_while_it_loads_is_loaded_again_not_mixed(model, monkeypatch, caplog):
    """Renamed over between the walk and ONNX Runtime's read, the same-shaped file of other weights would have lent
    its bytes to the old offsets: the session is dropped, and the usual load reads the new file."""
    caplog.set_level(logging.INFO, logger="immich_aio.mapped_load")
    other = make_model(model.parent / "other.onnx", seed=7)
    real = ort.InferenceSession

    def replaced_first(*args, **kwargs):
        os.replace(other, model)
        return real(*args, **kwargs)

    monkeypatch.setattr(mapped_load.ort, "InferenceSession", replaced_first)
    assert mapped_load.session(model, options, CPU) is None
    assert "changed while it loaded; loading it again" in caplog.text
    monkeypatch.setattr(mapped_load.ort, "InferenceSession", real)
    for got, want in zip(answers(ort_cache.plain_session(model, options, CPU)), usual(model), strict=True):
        assert np.array_equal(got, want)


def test_rewriting_the_file_in_place_after_the_load_leaves_the_session_answering(model):
    """With no mapping left, truncating and rewriting the file (a `cp` over it) cannot reach the session; a mapping
    left behind would end the process (SIGBUS), so this runs in a child."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
        import numpy as np
        from pathlib import Path
        from immich_aio import mapped_load
        import test_mapped_load as t
        mapped_load.MIN_FILE_BYTES = 0
        model = Path({str(model)!r})
        session = mapped_load.session(model, t.options, t.CPU)
        assert session is not None
        before = t.answers(session)
        with model.open("r+b") as f:
            f.truncate(0)
            f.write(b"not a model")
        after = t.answers(session)
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
        print("answered")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "answered" in done.stdout


def test_other_providers_small_files_and_unreadable_protobufs_take_the_usual_load(model, tmp_path, monkeypatch):
    assert mapped_load.session(model, options, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    monkeypatch.setattr(mapped_load, "MIN_FILE_BYTES", model.stat().st_size + 1)
    assert mapped_load.session(model, options, CPU) is None
    monkeypatch.setattr(mapped_load, "MIN_FILE_BYTES", 0)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0f" * 4096)  # wire type 7: no protobuf
    assert mapped_load.session(junk, options, CPU) is None
    with pytest.raises(Exception, match=r"(?i)protobuf|load model"):  # the usual load gives ONNX Runtime's error
        ort_cache.plain_session(junk, options, CPU)
    assert mapped_load.session(tmp_path / "missing.onnx", options, CPU) is None
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    assert mapped_load.session(fifo, options, CPU) is None  # not opened for reading to block on
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop)
    assert mapped_load.session(loop, options, CPU) is None


def test_a_model_with_nothing_to_map_takes_the_usual_load(tmp_path):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"])],
        "nothing",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3, 64])],
        [numpy_helper.from_array(rng.standard_normal((1000, 64)).astype(np.float32), "table")],
    )
    path = tmp_path / "model.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    assert mapped_load.session(path, options, CPU) is None


def test_the_servers_own_loads_use_it(model, tmp_path, monkeypatch):
    """The usual path of the server (no saved copy yet, or the cache off) builds the session this way."""
    from immich_aio.config import Settings
    from immich_aio.sessions import SessionFactory

    built: list[Path] = []
    real = mapped_load.session
    monkeypatch.setattr(mapped_load, "session", lambda source, *a, **k: built.append(source) or real(source, *a, **k))
    for cache in ("true", "false"):
        factory = SessionFactory(
            Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path / "store"), "IMMICH_AIO_ORT_CACHE": cache})
        )
        for got, want in zip(answers(factory.create(model)), usual(model), strict=True):
            assert np.array_equal(got, want)
    assert built == [model, model]


def test_the_walk_refuses_what_is_not_a_protobuf():
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        varint(b"\xff" * 11, 0)
    with pytest.raises(ValueError, match="truncated"):
        list(fields(b"\x0a\x05abc", 0, 5))  # a 5-byte field with 3 bytes left
    with pytest.raises(ValueError, match="wire type"):
        list(fields(b"\x0f", 0, 1))


def test_the_quick_walk_of_a_message_finds_what_the_field_walk_finds():
    """onnx_walk.messages (a node's fields, in one loop) against onnx_walk.fields, over every wire type: a varint, a
    64-bit and a 32-bit value, a field number that takes two bytes of key, a length that takes two bytes; and a
    message cut short is refused by both."""
    from immich_aio.onnx_walk import LENGTH_DELIMITED, encode_varint, length_field, messages, varint_field

    message = b"".join(
        [
            length_field(1, b"x"),
            varint_field(3, 300),
            encode_varint(4 << 3 | 1) + b"\x0a" * 8,  # fixed64 (bytes that would read as fields if miscounted)
            length_field(2, b"y" * 200),  # a two-byte length
            encode_varint(5 << 3 | 5) + b"\x0a" * 4,  # fixed32
            length_field(16, b"metadata"),  # a two-byte key
            length_field(7, b""),
        ]
    )
    want = [(f.number, f.value, f.end) for f in fields(message, 0, len(message)) if f.wire == LENGTH_DELIMITED]
    assert messages(message, 0, len(message)) == want
    assert [n for n, _, _ in want] == [1, 2, 16, 7]
    fixed = encode_varint(4 << 3 | 1) + bytes(8)
    for buf, cut in ((message, len(message) - 1), (message, len(message) - 12), (fixed, 5)):
        with pytest.raises(ValueError):
            messages(buf, 0, cut)
        with pytest.raises(ValueError):
            list(fields(buf, 0, cut))


def test_a_file_cut_short_or_too_many_fields_to_walk_takes_the_usual_load(model, tmp_path, monkeypatch):
    """The walk gives up (and lets the mapped file go) on a protobuf cut off mid-field, and on more fields than any
    model's graph has; the usual load then gives ONNX Runtime's own answer."""
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert mapped_load.session(cut, options, CPU) is None
    with pytest.raises(Exception, match=r"(?i)protobuf|load model"):
        ort_cache.plain_session(cut, options, CPU)
    monkeypatch.setattr(mapped_load, "MAX_FIELDS", 20)
    assert mapped_load.session(model, options, CPU) is None
    with model.open("rb") as f, pytest.raises(ValueError, match="more than 20 protobuf fields"):
        mapped_load.graph_with_mapped_weights(f.read(), model.name)
    monkeypatch.setattr(mapped_load, "MAX_FIELDS", 2_000_000)
    assert mapped_load.session(model, options, CPU) is not None


def test_a_graph_that_keeps_much_in_itself_takes_the_usual_load(model, monkeypatch):
    """Found as soon as it shows, not after walking the rest of the file (paged out, each tensor header is a read);
    the caller's read-ahead is then not asked for by the walk: the usual load asks for it."""
    monkeypatch.setattr(mapped_load, "MAX_GRAPH_BYTES", 1 << 20)  # this one keeps a 4 MB weight and a 256 KB table
    seen: list[int] = []
    real = mapped_load._mapped_tensor
    monkeypatch.setattr(mapped_load, "_mapped_tensor", lambda walk, f, *a: seen.append(f.start) or real(walk, f, *a))
    walked: list[bool] = []
    assert mapped_load.session(model, options, CPU, walked=lambda: walked.append(True)) is None
    assert walked == []
    tensors = len(onnx.load(str(model), load_external_data=False).graph.initializer)
    assert 0 < len(seen) < tensors  # stopped at the 4 MB weight (the fifth), before the Conv's, the table and more


def test_the_walk_reads_each_header_alone_and_the_file_is_asked_for_after_it(model, monkeypatch):
    """Issue 19, a first start on files from a paged-out disk: the walk jumps from one tensor header to the next
    across the file. Read with the kernel's usual 128 KB around each, and behind a read-ahead of the whole file, a
    ViT-B/16's walk took 276-353 ms; told it is random access, and before anything else is asked for, 59-100 ms.
    The file is then asked for whole (by the caller) while ONNX Runtime builds the session."""
    events: list[str] = []
    advice: list[int] = []

    class Spied:
        def __init__(self, buf):
            self.buf = buf

        def madvise(self, option: int, *a) -> None:
            advice.append(option)
            self.buf.madvise(option, *a)

    real_advise, real_walk, real_build = (
        mapped_load._random_access,
        mapped_load.graph_with_mapped_weights,
        ort.InferenceSession,
    )
    monkeypatch.setattr(mapped_load, "_random_access", lambda buf: real_advise(Spied(buf)))

    def walk(buf, name):
        events.append(f"walk after advice {advice}")
        return real_walk(buf, name)

    monkeypatch.setattr(mapped_load, "graph_with_mapped_weights", walk)
    monkeypatch.setattr(
        mapped_load.ort, "InferenceSession", lambda *a, **k: (events.append("build"), real_build(*a, **k))[1]
    )
    session = mapped_load.session(model, options, CPU, walked=lambda: events.append("asked"))
    assert session is not None
    assert events == [f"walk after advice {[mmap.MADV_RANDOM]}", "asked", "build"]


def test_the_servers_load_asks_for_the_file_after_the_walk_or_before_the_usual_load(model, monkeypatch):
    """Through ort_cache.plain_session (every load of a file with no copy): mapped, the file is asked for between
    the walk and the build, once; where the walk gives up (a graph too large to keep), before the usual load."""
    want = usual(model)
    events: list[str] = []
    real_walk, real_build = mapped_load.graph_with_mapped_weights, ort.InferenceSession
    monkeypatch.setattr(mapped_load, "graph_with_mapped_weights",
                        lambda buf, name: (events.append("walk"), real_walk(buf, name))[1])  # fmt: skip
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: (events.append("build"), real_build(*a, **k))[1])
    monkeypatch.setattr(mapped_load.ort, "InferenceSession", ort.InferenceSession)
    monkeypatch.setattr(ort_cache, "read_ahead_file", lambda path: events.append(f"asked {path.name}"))
    for got, expected in zip(answers(ort_cache.plain_session(model, options, CPU)), want, strict=True):
        assert np.array_equal(got, expected)
    assert events == ["walk", f"asked {model.name}", "build"]
    events.clear()
    monkeypatch.setattr(mapped_load, "MAX_GRAPH_BYTES", 1 << 20)
    for got, expected in zip(answers(ort_cache.plain_session(model, options, CPU)), want, strict=True):
        assert np.array_equal(got, expected)
    assert events == ["walk", f"asked {model.name}", "build"]  # the walk gave up; the usual load built it
    events.clear()
    monkeypatch.setattr(mapped_load, "MAX_GRAPH_BYTES", 8 << 20)
    monkeypatch.setattr(mapped_load, "mappings_of", lambda *a: 1)  # a mapped build refused after it was built
    for got, expected in zip(answers(ort_cache.plain_session(model, options, CPU)), want, strict=True):
        assert np.array_equal(got, expected)
    assert events == ["walk", f"asked {model.name}", "build", "build"]  # asked once, for both builds
