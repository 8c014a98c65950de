#!/usr/bin/env bash
# Build the container images and check them for real (run by .ci/run after the test suite).
#
#   CPU image:  built on the local Debian + Python 3.11 base, run with a published port on 127.0.0.1 and a
#               temporary volume at /cache, waited on until Docker reports it healthy; an OCR /predict with a
#               committed fixture must read the fixture's text; /info and /metrics must answer; the server runs
#               as a non-root user; `immich-aio models list` works inside; Chinese-CLIP's ready export is split
#               into towers inside the image, which has no torch; `docker stop` exits 0.
#   CUDA image: built from the same Dockerfile (--target cuda); inside it ONNX Runtime must list
#               CUDAExecutionProvider, and the only library missing must be the host driver (libcuda.so.1).
#   OpenVINO image: --target openvino; without an Intel GPU (as here) it must serve on ONNX Runtime's CPU provider
#               and say why once; with OpenVINO named (IMMICH_AIO_PROVIDERS) it must serve on OpenVINO's CPU
#               device and read every OCR fixture as the CPU provider did (same lines, boxes within 1 %).
#
# Uses ../shared/container (or $CONTAINER_TOOLS) to make the base image and run dockerd without touching the
# host's network. Where Docker cannot be set up, it says so and exits 0: the check is skipped, not failed.
# Everything it starts (containers, volume, images, and the dockerd when it started it) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${CONTAINER_TOOLS:-../shared/container}
DOCKER=${DOCKER:-/usr/bin/docker}
TAG=immich-aio-check
NAME=$TAG-$$
VOLUME=$TAG-$$

say() { printf '[container-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }

[[ -x $TOOLS/build-base.sh ]] || skip "$TOOLS/build-base.sh is not here, so no local base image can be made"

started_daemon=0
cleanup() {
    "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
    "$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
    "$DOCKER" image rm -f "$TAG:cpu" "$TAG:cuda" "$TAG:openvino" >/dev/null 2>&1 || true
    if ((started_daemon)); then # its own dockerd: its build cache goes too (60 GB after a few dozen runs here)
        "$DOCKER" builder prune --all --force >/dev/null 2>&1 || true
        "$TOOLS/stop-daemon.sh" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

"$DOCKER" info >/dev/null 2>&1 || started_daemon=1
export CTR_BRIDGE=1 # publishing -p 127.0.0.1:PORT:3003 needs the docker0 bridge
base=$("$TOOLS/build-base.sh" 2>/tmp/container-check-base.log | tail -n 1) \
    || { tail -20 /tmp/container-check-base.log; skip "Docker or the local base image could not be set up"; }
"$DOCKER" network inspect bridge >/dev/null 2>&1 \
    || skip "dockerd runs without the docker0 bridge (another run started it); stop it with $TOOLS/stop-daemon.sh"

build() { # build TARGET -> seconds
    local target=$1 t0=$(date +%s)
    DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress=plain --build-arg BASE_IMAGE="$base" \
        --target "$target" -t "$TAG:$target" . >"/tmp/container-check-$target.log" 2>&1 \
        || { tail -40 "/tmp/container-check-$target.log"; say "FAIL: the $target image does not build"; exit 1; }
    echo $(($(date +%s) - t0))
}
size() { "$DOCKER" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }

# ---- CPU image --------------------------------------------------------------------------------------------
cpu_s=$(build cpu)
say "CPU image built in ${cpu_s} s: $(size "$TAG:cpu")"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$DOCKER" volume create "$VOLUME" >/dev/null
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$port:3003" -v "$VOLUME:/cache" "$TAG:cpu" >/dev/null
health=starting
for _ in $(seq 1 120); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME")
    [[ $health == healthy || $health == unhealthy ]] && break
    [[ $("$DOCKER" inspect -f '{{.State.Status}}' "$NAME") == running ]] || break
    sleep 1
done
if [[ $health != healthy ]]; then
    "$DOCKER" logs --tail 40 "$NAME" 2>&1 || true
    say "FAIL: the CPU container is $health, not healthy"
    exit 1
fi
say "healthy; checking OCR, /info, /metrics and the user"
url="http://127.0.0.1:$port"
entries='{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.5,"maxResolution":736}},"recognition":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.8}}}}'
curl -sS --fail-with-body -F "entries=$entries" -F "image=@tests/fixtures/ocr/sign.jpg;filename=blob;type=application/octet-stream" \
    "$url/predict" >/tmp/container-check-ocr.json
curl -sS --fail-with-body "$url/info" >/tmp/container-check-info.json
curl -sS --fail-with-body "$url/metrics" >/tmp/container-check-metrics.txt
python3 - <<'PY'
import json
truth = json.load(open("tests/fixtures/ocr/truth.json", encoding="utf-8"))["sign.jpg"]
body = json.load(open("/tmp/container-check-ocr.json", encoding="utf-8"))
assert body["ocr"]["text"] == truth, (body["ocr"]["text"], truth)
info = json.load(open("/tmp/container-check-info.json", encoding="utf-8"))
assert info["modelStore"] == "/cache" and "CPUExecutionProvider" in info["providers"], info
assert info["allocator"] == "jemalloc", info["allocator"]
assert {m["name"] for m in info["models"]} == {"PP-OCRv6_small"}, info["models"]
assert "immich_aio_requests_total" in open("/tmp/container-check-metrics.txt").read()
print("  OCR read", " / ".join(body["ocr"]["text"]))
PY
[[ $("$DOCKER" exec "$NAME" id -u) == 1000 ]] || { say "FAIL: the server does not run as uid 1000"; exit 1; }
"$DOCKER" exec "$NAME" immich-aio models list >/dev/null || { say "FAIL: immich-aio models does not run inside"; exit 1; }
# Chinese-CLIP with no torch: a transformers.js-style combined graph (tiny random weights, made with the test
# environment's torch) is split into towers inside the image, which has no torch.
clip_src=$(mktemp -d)
.venv/bin/python - "$clip_src" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from xenova_clip import combined_export, tiny_hf_model
combined_export(tiny_hf_model(), Path(sys.argv[1]) / "model.onnx")
PY
cp tests/.vendor/cn_clip/clip/vocab.txt "$clip_src/vocab.txt"
chmod -R a+rX "$clip_src" # mktemp's folder is the host user's alone; the server in the image runs as uid 1000
"$DOCKER" cp "$clip_src/." "$NAME:/tmp/clip-src"
rm -rf "$clip_src"
"$DOCKER" exec "$NAME" python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' \
    || { say "FAIL: the image carries torch"; exit 1; }
"$DOCKER" exec "$NAME" mkdir -p /tmp/clip-out
split=$("$DOCKER" exec "$NAME" python -m immich_aio.download.clip_split /tmp/clip-src/model.onnx /tmp/clip-out \
    /tmp/clip-src/vocab.txt 32 2>&1) || true
split=$(tail -n 1 <<<"$split")
[[ $split == '{"embed_dim": 512}' ]] || { echo "$split"; say "FAIL: Chinese-CLIP's export is not split inside the image"; exit 1; }
"$DOCKER" stop -t 20 "$NAME" >/dev/null
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$NAME")
[[ $code == 0 ]] || { "$DOCKER" logs --tail 20 "$NAME" 2>&1; say "FAIL: docker stop gave exit code $code, not 0"; exit 1; }
"$DOCKER" rm "$NAME" >/dev/null
say "CPU image: PASS (OCR, /info, jemalloc, /metrics, uid 1000, models CLI, Chinese-CLIP split without torch, clean stop)"

# ---- CUDA image -------------------------------------------------------------------------------------------
cuda_s=$(build cuda)
say "CUDA image built in ${cuda_s} s: $(size "$TAG:cuda")"
"$DOCKER" run --rm --network none --entrypoint python "$TAG:cuda" - <<'PY' || { say "FAIL: the CUDA image"; exit 1; }
import glob, os, subprocess
import onnxruntime as ort
assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
ort.preload_dlls()  # CUDA and cuDNN from the pip packages
lib = glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime_providers_cuda.so"))[0]
nvidia = sorted(set(os.path.dirname(p) for p in glob.glob("/opt/venv/lib/python3.11/site-packages/nvidia/**/lib/*.so*", recursive=True)))
env = dict(os.environ, LD_LIBRARY_PATH=":".join(nvidia))
missing = sorted({line.split()[0] for line in subprocess.run(["ldd", lib], env=env, capture_output=True, text=True).stdout.splitlines() if "not found" in line})
assert missing == ["libcuda.so.1"], f"missing besides the host driver: {missing}"
print("  providers:", ", ".join(ort.get_available_providers()), "| ORT", ort.__version__, "| missing only:", missing[0])
PY
# Without a GPU (as here) the CUDA image must still serve, on the CPU, after one clear warning.
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$port:3003" "$TAG:cuda" >/dev/null
for _ in $(seq 1 60); do curl -sf "$url/ping" >/dev/null 2>&1 && break; sleep 1; done
curl -sS --fail-with-body -F "entries=$entries" -F "image=@tests/fixtures/ocr/sign.jpg;filename=blob" "$url/predict" \
    | grep -q "OPEN 24 HOURS" || { "$DOCKER" logs "$NAME" 2>&1 | tail -20; say "FAIL: the CUDA image does not serve"; exit 1; }
logs=$("$DOCKER" logs "$NAME" 2>&1)
[[ $(grep -c "CUDA is installed but cannot run here" <<<"$logs") == 1 && $(grep -c "EP Error" <<<"$logs") == 0 ]] \
    || { echo "$logs" | head -20; say "FAIL: without a GPU the CUDA image must warn once, clearly"; exit 1; }
"$DOCKER" rm -f "$NAME" >/dev/null
say "CUDA image: PASS (CUDAExecutionProvider listed; only the host driver libcuda.so.1 is missing; without a GPU it serves on the CPU after one warning)"

# ---- OpenVINO image ---------------------------------------------------------------------------------------
ov_s=$(build openvino)
say "OpenVINO image built in ${ov_s} s: $(size "$TAG:openvino")"
"$DOCKER" volume rm -f "$VOLUME" >/dev/null && "$DOCKER" volume create "$VOLUME" >/dev/null
ocr_fixtures() { # ocr_fixtures PREFIX: every OCR fixture through the running container
    for fixture in sign receipt small_text_1440 rotated; do
        curl -sS --fail-with-body -F "entries=$entries" -F "image=@tests/fixtures/ocr/$fixture.jpg;filename=blob" \
            "$url/predict" >"/tmp/container-check-$1-$fixture.json" \
            || { "$DOCKER" logs "$NAME" 2>&1 | tail -20; say "FAIL: the OpenVINO image does not serve OCR"; exit 1; }
    done
}
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$port:3003" "$TAG:openvino" >/dev/null
for _ in $(seq 1 60); do curl -sf "$url/ping" >/dev/null 2>&1 && break; sleep 1; done
ocr_fixtures cpu
curl -sS --fail-with-body "$url/info" | grep -q '"providers":\["CPUExecutionProvider"\]' \
    && [[ $("$DOCKER" logs "$NAME" 2>&1 | grep -c "OpenVINO lists no Intel GPU here") == 1 ]] \
    || { "$DOCKER" logs "$NAME" 2>&1 | tail -20; say "FAIL: without an Intel GPU the OpenVINO image must serve on the CPU provider, saying why once"; exit 1; }
"$DOCKER" rm -f "$NAME" >/dev/null
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$port:3003" -v "$VOLUME:/cache" \
    -e IMMICH_AIO_PROVIDERS=OpenVINOExecutionProvider,CPUExecutionProvider "$TAG:openvino" >/dev/null
for _ in $(seq 1 60); do curl -sf "$url/ping" >/dev/null 2>&1 && break; sleep 1; done
ocr_fixtures ov
curl -sS --fail-with-body "$url/info" >/tmp/container-check-ov-info.json
python3 - <<'PY' || { "$DOCKER" logs "$NAME" 2>&1 | tail -20; say "FAIL: the OpenVINO image"; exit 1; }
import json
fixtures = ("sign", "receipt", "small_text_1440", "rotated")
for fixture in fixtures:
    cpu, ov = (json.load(open(f"/tmp/container-check-{side}-{fixture}.json", encoding="utf-8"))["ocr"]
               for side in ("cpu", "ov"))
    assert ov["text"] == cpu["text"] and cpu["text"], (fixture, ov["text"], cpu["text"])
    assert max(abs(a - b) for a, b in zip(ov["box"], cpu["box"], strict=True)) < 0.01, (fixture, ov["box"], cpu["box"])
info = json.load(open("/tmp/container-check-ov-info.json", encoding="utf-8"))
assert info["providers"] == ["OpenVINOExecutionProvider", "CPUExecutionProvider"], info["providers"]
assert info["openvinoDevice"] == "CPU", info
for model in info["models"]:
    assert model["providers"][0] == "OpenVINOExecutionProvider", model
print("  OpenVINO (CPU device) read every OCR fixture as the CPU provider did:", len(fixtures), "photos")
PY
"$DOCKER" stop -t 20 "$NAME" >/dev/null
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$NAME")
[[ $code == 0 ]] || { "$DOCKER" logs --tail 20 "$NAME" 2>&1; say "FAIL: the OpenVINO image stopped with $code"; exit 1; }
"$DOCKER" rm "$NAME" >/dev/null
say "OpenVINO image: PASS (no Intel GPU: CPU provider, said once; OpenVINO named: served on its CPU device, every OCR fixture read as the CPU provider did, clean stop)"
say "summary: CPU image $(size "$TAG:cpu") built in ${cpu_s} s; CUDA image $(size "$TAG:cuda") built in ${cuda_s} s; OpenVINO image $(size "$TAG:openvino") built in ${ov_s} s"
