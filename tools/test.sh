#!/usr/bin/env bash
# The README's test command (.ci/run) with extra pytest arguments, e.g. `bash tools/test.sh -k seg`.
exec bash "$(dirname "$0")/../.ci/run" "$@"
