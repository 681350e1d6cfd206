#!/usr/bin/env python3
"""Score images with a vision-language judge.

  python main.py --config configs/demo.yaml [--set key=value ...]     run a scoring job
  python main.py serve --config configs/server.yaml                    HTTP reward service
  python main.py report outputs/demo/results.jsonl [--out report.html] HTML report of a job

--set takes dotted keys into the config, values parsed as YAML:
  --set model.params.batch_size=4 --set job.output_dir=outputs/run2
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

COMMANDS = ("run", "serve", "report")


def _config_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (dotted key; repeatable)")


def cmd_run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="main.py", description="Run a scoring job.")
    _config_args(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    from src.job.manifest import ManifestError
    from src.job.runner import run_job
    from src.models.reward import ConfigError, load_config
    from src.models.reward.pool import WorkerStartError

    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_job(cfg, base=ROOT, progress=not args.no_progress)
    except (ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerStartError as e:  # a broken worker environment: its traceback is in the message
        print(f"error: the judge's workers could not start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped; results so far are in the output folder and a re-run resumes",
              file=sys.stderr)
        return 130
    brief = {k: summary[k] for k in ("items", "scored", "failed", "score", "failures_by_kind", "resumed_from_disk")}
    print(json.dumps(brief, indent=2))
    return 0


def cmd_serve(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="main.py serve", description="Serve a reward model over HTTP.")
    _config_args(ap)
    args = ap.parse_args(argv)
    try:
        from src.service.server import serve_from_config
    except ImportError as e:
        print(f"error: the HTTP service needs its extra packages ({e}); run setup_env.sh", file=sys.stderr)
        return 2
    from src.models.reward import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        return serve_from_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_report(argv: list[str]) -> int:
    try:
        from src.report.cli import main as report_main
    except ImportError as e:
        print(f"error: the report module is missing ({e})", file=sys.stderr)
        return 2
    return report_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in COMMANDS:
        cmd, rest = argv[0], argv[1:]
    else:
        cmd, rest = "run", argv
    try:
        return {"run": cmd_run, "serve": cmd_serve, "report": cmd_report}[cmd](rest)
    except KeyboardInterrupt:  # before a command could handle it (while importing, reading the config)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
