#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/gpu/suite.py needs on the GPU machine, which has no network:
# the wheels it lacks, for its platform (CPython 3.12, x86_64 manylinux), in the git-ignored folder .whl/.
# On the GPU machine they are installed with
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# and put first on PYTHONPATH (benchmarks/gpu/README.md has the one device command).
#
# What the GPU machine already has (its image, read 2026-11): torch 2.11, transformers 5.17.0, sentence-transformers
# 6.0.1, accelerate 1.15, peft, huggingface_hub 1.33, tokenizers 0.23, safetensors, numpy, pandas, pyarrow, xxhash,
# fsspec, aiohttp, requests, tqdm, pyyaml, filelock, packaging, scikit-learn, scipy (DEVICE_HAS below).
# What it lacks and the suite needs:
#   datasets (sentence-transformers' trainer and trainers/supervised.py build Datasets), with its missing
#   requirements dill and multiprocess;
#   sentence-transformers 6.2.0 in place of the machine's 6.0.1: transformers 5.17's Trainer calls
#   `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=..., every_n_layers=...)`, which
#   SentenceTransformer 6.0.1 rejects (TypeError) and 6.2.0 accepts, so gradient-checkpointed training (section 4)
#   needs 6.2.0 (checked 2026-12-01 with transformers 5.17.0 and huggingface_hub 1.33.0 first on PYTHONPATH).
#   Versions are the ones this project's tests run with.
# What is deliberately NOT carried:
#   transformers: conan_hf works with the machine's transformers 5.17.0 (checked 2026-12-01: the 69 non-slow tests of
#     tests/test_modeling.py, test_soft_mask.py, test_encode.py, test_sentence.py and test_stages.py pass with
#     transformers 5.17.0, sentence-transformers 6.2.0 and huggingface_hub 1.33.0 first on PYTHONPATH, and so does
#     `suite.py --smoke`), so the suite measures the machine's own transformers and no 12 MB wheel travels.
#   deepspeed: PyPI has only a source tarball (no wheel to carry); the suite trains with torch AdamW instead.
#   mteb: the suite evaluates nothing; mteb and its requirements (polars alone is ~40 MB) would not fit the 64 MiB
#     that a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    PYTHON=.venv/bin/python
fi
DEST=.whl
LIST=benchmarks/results/gpu_wheels.txt
# name==version: what the suite needs on the GPU machine that its image lacks, at the versions of the project's lock
# (requirements/lock.txt, what the tests run with); the defaults apply where the lock is absent.
LOCK=requirements/lock.txt
pin() {
    local version
    version=$(grep -i -m1 "^$1==" "$LOCK" 2>/dev/null | cut -d= -f3 | tr -d ' ' || true)
    echo "$1==${version:-$2}"
}
WHEELS=("$(pin datasets 5.2.0)" "$(pin dill 0.4.1)" "$(pin multiprocess 0.70.19)" "$(pin sentence-transformers 6.2.0)")
PLATFORM_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
               --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Python packages of the GPU machine's image (KINDS.md of the device tool, read 2026-11-17), normalised names.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping
jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

rm -rf "$DEST"
mkdir -p "$DEST"
echo "Downloading ${WHEELS[*]} for CPython 3.12 / manylinux x86_64 into $DEST/"
"$PYTHON" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$DEST" "${WHEELS[@]}"

# The DeepSpeed the project runs with (PyPI's only deepspeed wheels are 0.3.1 dev builds from 2020).
DEEPSPEED=$(pin deepspeed 0.19.8)
deepspeed_note="$DEEPSPEED: no wheel on PyPI (source tarball only): not carried; the suite trains with torch AdamW"
probe=$(mktemp -d)
if "$PYTHON" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$probe" "$DEEPSPEED" >/dev/null 2>&1; then
    deepspeed_note="$DEEPSPEED: a wheel exists now; not carried yet: add it and its requirements to WHEELS"
fi
rm -rf "$probe"
echo "$deepspeed_note"

# Every requirement of every carried wheel must be on the GPU machine already or carried too.
normalise() { tr '[:upper:]_.' '[:lower:]--'; }
carried=$(for w in "$DEST"/*.whl; do basename "$w" | cut -d- -f1 | normalise; done)
missing=()
for wheel in "$DEST"/*.whl; do
    while read -r requirement; do
        name=$(echo "$requirement" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | normalise)
        if ! grep -qw -- "$name" <<<"$DEVICE_HAS $carried"; then
            missing+=("$(basename "$wheel"): $name")
        fi
    done < <(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
done
if [ ${#missing[@]} -gt 0 ]; then
    printf 'Requirement neither on the GPU machine nor carried: %s\n' "${missing[@]}" >&2
    exit 1
fi

if [ ! -f benchmarks/gpu/real_lengths.json ] && [ -n "${CONAN_DATA_DIR:-}" ]; then
    "$PYTHON" benchmarks/gpu/suite.py --record-lengths "$CONAN_DATA_DIR"
fi

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
{
    echo "# Wheels carried to the GPU machine by benchmarks/gpu/prepare.sh (written $(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo "# pip download ${PLATFORM_ARGS[*]} -d .whl ${WHEELS[*]}"
    echo "# bytes  file"
    for wheel in "$DEST"/*.whl; do
        printf '%9d  %s\n' "$(stat -c %s "$wheel")" "$(basename "$wheel")"
    done
    printf '%9d  total (%.2f MiB); working tree without .whl: %.2f MiB; device limit 64 MiB\n' \
        "$total" "$(echo "$total / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)"
    echo "# sentence-transformers 6.2.0 replaces the machine's 6.0.1 (6.0.1 rejects transformers 5.17's"
    echo "#   gradient_checkpointing_enable(every_n_layers=...)); not carried: transformers (the machine's 5.17.0"
    echo "#   works), mteb (not needed, too large); $deepspeed_note"
} > "$LIST"
cat "$LIST"
