#!/usr/bin/env python3
"""Score images with a vision-language judge.

  python main.py --config configs/demo.yaml [--set key=value ...]     run a scoring job
  python main.py serve --config configs/server.yaml                    HTTP reward service
  python main.py report outputs/demo/results.jsonl [--out report.html] HTML report of a job

The same commands are installed as `qwen-judge` (`qwen-judge run|serve|report ...`); both run
src/cli.py. Here, relative paths in a config are read from this repository's folder.
"""
import sys

try:  # Ctrl-C while importing: no traceback, the usual exit code
    from src.interrupts import keep_lost_ctrl_c, raise_lost_ctrl_c

    keep_lost_ctrl_c()  # first: a Ctrl-C that lands in an import's lock cleanup is not lost
    from pathlib import Path

    from src.cli import main

    raise_lost_ctrl_c()
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.exit(main(prog="main.py", base=ROOT))
