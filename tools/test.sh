#!/usr/bin/env bash
# Install the project + test peers into .venv and run the test suite (the README's command 2).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements-test.txt
pip install -q --no-deps -e .
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
python -m pytest tests -n 2 --dist loadfile "$@"
