#!/usr/bin/env python3
"""Score images with a vision-language judge.

  python main.py --config configs/demo.yaml [--set key=value ...]     run a scoring job
  python main.py serve --config configs/server.yaml                    HTTP reward service
  python main.py report outputs/demo/results.jsonl [--out report.html] HTML report of a job

The same commands are installed as `qwen-judge` (`qwen-judge run|serve|report ...`); both run
src/cli.py. Here, relative paths in a config are read from this repository's folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

from src.cli import main

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.exit(main(prog="main.py", base=ROOT))
