#!/usr/bin/env bash
# Prints the python of the environment the project uses: the active virtualenv, else ./.venv.
if [ -n "${VIRTUAL_ENV:-}" ]; then echo "$VIRTUAL_ENV/bin/python"; else echo "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"; fi
