#!/usr/bin/env bash
# Build llama.cpp tools (`llama-server`: parallel slots, continuous batching; `llama-bench`; `llama-quantize`) from
# the llama.cpp source that the llama-cpp-python sdist on PyPI vendors, hash-pinned; CPU only, native instructions.
# 4 to 30 minutes on 2 cores (idle to busy) for the first tool, less for the next (shared objects are reused).
#   scripts/build_llama_cpp.sh [DEST [TARGET...]]   (default build/llama.cpp llama-server; binaries end up at DEST/TARGET)
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
DEST=${1:-build/llama.cpp}
shift $(( $# > 0 ? 1 : 0 ))
TARGETS=("${@:-llama-server}")
SDIST=llama_cpp_python-$VERSION.tar.gz

mkdir -p "$DEST"
cd "$DEST"
# The sdist's address from PyPI's simple index (pip download would build its build dependencies from source first)
if [ ! -f "$SDIST" ]; then
    URL=$(curl -fsS https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*/$SDIST" | head -1)
    [ -n "$URL" ] || { echo "error: $SDIST not found on PyPI's simple index" >&2; exit 1; }
    curl -fsSL -o "$SDIST.part" "$URL" && mv "$SDIST.part" "$SDIST"
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet -
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "$SDIST"
GENERATOR=$(command -v ninja >/dev/null && echo Ninja || echo "Unix Makefiles")
cmake -S "llama_cpp_python-$VERSION/vendor/llama.cpp" -B cmake-build -G "$GENERATOR" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >/dev/null
for target in "${TARGETS[@]}"; do
    cmake --build cmake-build --target "$target" -j "$(nproc)"
    ln -sf "cmake-build/bin/$target" "$target"
    echo "built $DEST/$target"
done
