#!/usr/bin/env bash
# Builds llama.cpp's llama-server, the OpenAI-compatible server that is not plait which the
# remote client's tests drive, from the llama.cpp sources the llama-cpp-python sdist on
# PyPI carries (pinned, checked by its sha256), with cmake and ninja from PyPI, into
# .test-clients/ (ignored by git). Takes about 8 minutes on two cores; a second run
# reuses the build. Prints the environment the tests read; `.ci/run` evaluates it.
# Other llama.cpp tools from the same build may be named (`llama-bench llama-batched-bench`,
# for docs/PERFORMANCE.md's side-by-side runs); llama-server is always built.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
dir=.test-clients/llama
server="$dir/build/bin/llama-server"
targets="llama-server $*"
missing=no
for t in $targets; do
  [ -x "$dir/build/bin/$t" ] || missing=yes
done

if [ "$missing" = yes ]; then
  mkdir -p "$dir"
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja >&2
  if [ ! -d "$dir/src" ]; then
    # The sdist's address and digest from PyPI's JSON API (its address may be relative).
    "$dir/venv/bin/python" - "$VERSION" "$dir/sdist.tar.gz" >&2 <<'EOF'
import hashlib, json, sys, urllib.parse, urllib.request
version, out = sys.argv[1], sys.argv[2]
meta_url = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(meta_url, timeout=60))
sdist = next(u for u in meta["releases"][version] if u["packagetype"] == "sdist")
data = urllib.request.urlopen(urllib.parse.urljoin(meta_url, sdist["url"]), timeout=600).read()
if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
    sys.exit(f"llama-cpp-python {version}: the sdist's sha256 does not match PyPI's")
open(out, "wb").write(data)
EOF
    mkdir -p "$dir/src"
    tar xzf "$dir/sdist.tar.gz" -C "$dir/src" --strip-components=3 \
      "llama_cpp_python-$VERSION/vendor/llama.cpp"
    rm "$dir/sdist.tar.gz"
  fi
  # No web UI (it would be fetched), no HTTPS, no curl: a loopback test server needs none.
  PATH="$PWD/$dir/venv/bin:$PATH" cmake -S "$dir/src" -B "$dir/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2
  # shellcheck disable=SC2086 # one target per word
  PATH="$PWD/$dir/venv/bin:$PATH" cmake --build "$dir/build" --target $targets -j 2 >&2
fi
echo "export PLAIT_TEST_LLAMA_SERVER=$PWD/$server"
