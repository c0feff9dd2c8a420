#!/usr/bin/env bash
# Install Triton's perf_analyzer and print the path of a launcher that runs it.
#
#   scripts/install-perf-analyzer.sh [DIR]     # default DIR: $PERF_ANALYZER_HOME, else ~/.cache/serving/perf-analyzer
#   "$(scripts/install-perf-analyzer.sh)" -m digits-tf -u localhost:8001 -i grpc --input-data zero
#
# PyPI's `perf-analyzer` package is a placeholder without the binary. The binary that runs on this Debian
# (glibc 2.36) is the one inside the tritonclient 2.51.0 wheel (2.60's needs glibc 2.38). It links against
# libb64 (Debian's libb64-0d) and CUDA's runtime library, which the nvidia-cuda-runtime-cu12 wheel ships (no
# GPU is needed to drive a CPU server). Both wheels are only unpacked into DIR, never installed into a Python
# environment (tritonclient 2.51 would replace the project's own tritonclient). The launcher DIR/perf_analyzer
# puts the CUDA library on LD_LIBRARY_PATH. The tests (tests/server/test_perf_analyzer.py) and the benchmark
# (bench/grpc.py) run this script; a second run finds the launcher and only prints its path.
set -euo pipefail

TRITONCLIENT=2.51.0
CUDA_RUNTIME=12.9.79
DIR=${1:-${PERF_ANALYZER_HOME:-$HOME/.cache/serving/perf-analyzer}}
DIR=$DIR/$TRITONCLIENT
LAUNCHER=$DIR/perf_analyzer
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

works() {
  local version
  [ -x "$LAUNCHER" ] && version=$("$LAUNCHER" --version 2>&1) && [[ $version == *"Perf Analyzer Version"* ]]
}

if works; then
  echo "$LAUNCHER"
  exit 0
fi

# libb64: a Debian package without a command, so not scripts/system-packages.sh's kind of check.
if ! dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q "install ok installed"; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "perf_analyzer needs libb64-0d; run: sudo apt-get install -y libb64-0d" >&2
    exit 1
  fi
  echo "installing libb64-0d from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
  fi
fi

mkdir -p "$DIR/wheels"
"$PYTHON" -m pip download --quiet --no-deps --dest "$DIR/wheels" \
  "tritonclient==$TRITONCLIENT" "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME" >&2
"$PYTHON" - "$DIR" <<'PY'
import sys, zipfile
from pathlib import Path

folder = Path(sys.argv[1])
(folder / "bin").mkdir(exist_ok=True)
(folder / "lib").mkdir(exist_ok=True)
for wheel in (folder / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith("/data/bin/perf_analyzer"):
                target = folder / "bin" / "perf_analyzer"
            elif "/cuda_runtime/lib/libcudart.so" in name:
                target = folder / "lib" / Path(name).name
            else:
                continue
            target.write_bytes(archive.read(name))
            target.chmod(0o755)
PY
rm -rf "$DIR/wheels"
cat >"$LAUNCHER" <<EOF
#!/bin/sh
# Triton's perf_analyzer from the tritonclient $TRITONCLIENT wheel (scripts/install-perf-analyzer.sh)
LD_LIBRARY_PATH="$DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$DIR/bin/perf_analyzer" "\$@"
EOF
chmod 755 "$LAUNCHER"
if ! works; then
  echo "perf_analyzer does not run here:" >&2
  "$LAUNCHER" --version >&2 || true
  exit 1
fi
echo "$LAUNCHER"
