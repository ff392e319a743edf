#!/usr/bin/env bash
# Install everything the test suite needs (once), then run the whole suite.
# Used as-is by .ci/run; the README's second set-up command.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian chromium (browser tests)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== installing Python requirements"
python3 -m pip install -q -r requirements-test.txt
python3 -m pip install -q --no-deps -e .

shared="$(python3 -c 'from ghist_core.paths import shared_data_dir; print(shared_data_dir())')"
if [ -d "$shared" ]; then
  echo "== shared datasets at $shared"
else
  echo "== no shared datasets at $shared: the tests that need them skip (set GHIST_SHARED_DATA)"
fi

echo "== running the test suite"
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$rc"
