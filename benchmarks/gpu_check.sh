#!/usr/bin/env bash
# The GPU checks in one run (about 8 minutes on an H200): CUDA features equal the CPU ones, the GPU
# decode tests, and the extraction benchmark with ResNet-50 in bf16, decoding in processes (the default on
# CUDA) and through both GPU decoders.
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds wheels to install first, for a machine without an index, e.g. made with
#   pip download --no-deps -d WHEELS_DIR nvidia-nvimgcodec-cu13 nvidia-nvjpeg
# They are installed into WHEELS_DIR/site (put on PYTHONPATH), not into the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
if [[ $# -ge 1 ]]; then
    "$python" -m pip install --quiet --no-deps --no-index --target "$1/site" "$1"/*.whl
    export PYTHONPATH="$1/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$python" -c "from crossalign.extract.gpu_decode import import_nvimgcodec; import_nvimgcodec()" \
    && decodes=processes,nvjpeg,nvimgcodec || decodes=processes,nvjpeg
echo "== smoke: CUDA features vs CPU fp32, every decoder"
"$python" benchmarks/gpu_smoke.py 256
echo "== GPU decode tests"
"$python" -m pytest -q -p no:cacheprovider tests/test_extract.py -k "gpu_decode or nvimgcodec or nvjpeg"
echo "== extraction benchmark: ResNet-50 bf16, decode $decodes"
"$python" benchmarks/extract.py --image-encoder torchvision:resnet50@random --device cuda --precision bf16 \
    --variants 20000 --rounds 3 --skip-text --compile off --decode "$decodes"
