#!/usr/bin/env bash
# Build llama.cpp's llama-server once per machine, from the llama.cpp source that the
# llama-cpp-python sdist vendors (a pinned PyPI package, so it builds offline), and cache
# it outside the repository:
#
#   $LAB_CACHE_DIR/llama-server-<version>/bin/llama-server
#
# LAB_CACHE_DIR defaults to ~/.cache/speculative-decoding-lab (as in lab/models/presets.py).
# Safe to run again: a cached binary that answers --version returns at once.
# About 15-20 minutes on 2 cores (15 measured at nice 19 beside other jobs); run it with `nice -n 19` beside other work.
# Keep LLAMA_CPP_PYTHON_VERSION equal to lab/serving/llama_server.py's LLAMA_CPP_PYTHON_VERSION.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${LAB_CACHE_DIR:-$HOME/.cache/speculative-decoding-lab}"
target="$cache/llama-server-$version"
binary="$target/bin/llama-server"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
  echo "llama-server $version already built: $binary"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "==> downloading the llama-cpp-python $version sdist (llama.cpp source inside)"
"$py" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"

echo "==> configuring (server only, no web UI download, no OpenSSL)"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S "$src" -B "$work/build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DGGML_OPENMP=OFF

echo "==> building llama-server with ${LLAMA_BUILD_JOBS:-2} jobs"
cmake --build "$work/build" --target llama-server -j "${LLAMA_BUILD_JOBS:-2}"

# Install into a temporary folder, then rename: an interrupted build leaves no half cache.
staging="$target.partial"
rm -rf "$staging"
mkdir -p "$staging/bin"
cp "$work/build/bin/llama-server" "$staging/bin/"
cp "$src/LICENSE" "$staging/LICENSE-llama.cpp"
rm -rf "$target"
mv "$staging" "$target"
"$binary" --version
echo "llama-server $version built: $binary"
