#!/usr/bin/env bash
# The GPU checks in one run (about 6-8 minutes on an H200), most important first:
#   1. the extraction benchmark: ResNet-50 in bf16 on real photos, decoding in processes (the default
#      on CUDA) and on the GPU (nvJPEG, and nvImageCodec where it is installed);
#   2. the smoke check: CUDA features equal the CPU fp32 ones, for every decoder;
#   3. the GPU decode tests.
# A step that fails does not stop the later ones; the exit status says whether any failed.
#
#   bash benchmarks/gpu_prepare.sh          # here, once: fills .devicepkgs/ and .devdata/ (ignored by git)
#   PYTHONPATH=.devicepkgs bash benchmarks/gpu_check.sh .devicepkgs/wheels     # there, carrying both
#
# WHEELS_DIR (the optional argument) holds wheels to install first, for a machine without an index;
# they go into WHEELS_DIR/site (put on PYTHONPATH), not into the environment. CORPUS (default
# .devdata/flickr8k where it exists, else the benchmark's default) is the photos the variants are made
# from. Where $OUT is set, each step's output is also written there.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
corpus=${CORPUS:-}
[[ -z "$corpus" && -d .devdata/flickr8k ]] && corpus=.devdata/flickr8k
if [[ $# -ge 1 ]]; then
    "$python" -m pip install --quiet --no-deps --no-index --target "$1/site" "$1"/*.whl
    export PYTHONPATH="$1/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
"$python" -c "from crossalign.extract.gpu_decode import import_nvimgcodec; import_nvimgcodec()" \
    && decodes=processes,nvjpeg,nvimgcodec || decodes=processes,nvjpeg

failed=()
step() {  # step NAME COMMAND...: run it, keep its output in $out/NAME.log, note a failure
    local name=$1
    shift
    echo "== $name"
    "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    [[ $status -eq 0 ]] || failed+=("$name (exit $status)")
}

step benchmark "$python" benchmarks/extract.py ${corpus:+--corpus "$corpus"} \
    --image-encoder torchvision:resnet50@random --device cuda --precision bf16 \
    --variants 20000 --rounds 3 --skip-text --compile off --decode "$decodes"
step smoke "$python" benchmarks/gpu_smoke.py 256
step tests "$python" -m pytest -q -p no:cacheprovider tests/test_extract.py \
    -k "nvimgcodec_decodes_like or gpu_decode_path_matches"

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
