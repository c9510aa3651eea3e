#!/usr/bin/env bash
# Installs the real clients the server's tests drive, pinned, into .test-clients/ (ignored
# by git): the OpenAI Python SDK in a venv, and Codex CLI from the npm registry. Prints the
# environment the tests read; `.ci/run` evaluates it.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENAI_VERSION=3.57.0
CODEX_VERSION=0.171.0
dir=.test-clients

if [ ! -x "$dir/venv/bin/python" ] || ! "$dir/venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION" >&2
fi
if [ "$("$dir/node/node_modules/.bin/codex" --version 2>/dev/null)" != "codex-cli $CODEX_VERSION" ]; then
  npm install --silent --no-audit --no-fund --prefix "$dir/node" "@openai/codex@$CODEX_VERSION" >&2
fi
echo "export PLAIT_TEST_PYTHON=$PWD/$dir/venv/bin/python"
echo "export PLAIT_TEST_CODEX=$PWD/$dir/node/node_modules/.bin/codex"
