#!/usr/bin/env bash
# Rebuild the extension in place (editable install, no build isolation). Serialised with a lock, so
# several shells (or agents) rebuilding at once take turns instead of corrupting build/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/glm5-build.lock pip install --no-build-isolation -e . -q "$@"
