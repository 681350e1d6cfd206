"""The command line: `python main.py ...` and the installed `qwen-judge ...` run this same code.

  run     --config X.yaml [--set key=value] [--unset key]   a scoring job (the default command)
  serve   --config configs/server.yaml                      the HTTP reward service
  report  RESULTS.jsonl [--out report.html]                 an offline HTML report of a job

Relative paths in a config (manifest, output_dir, server.allowed_dirs) are read from the
repository with `python main.py` (as they always were), and from the current folder with
`qwen-judge`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from src.interrupts import keep_lost_ctrl_c, raise_lost_ctrl_c
from src.models.reward.errors import JudgeError, JudgeStartError, exit_code

COMMANDS = ("run", "serve", "report")

_OVERVIEW = """\
commands:
  {prog} [run] --config X.yaml [--set KEY=VALUE] [--unset KEY]   run a scoring job (the default)
  {prog} serve --config configs/server.yaml                      serve the judge over HTTP
  {prog} report RESULTS.jsonl [--out FILE.html]                  write an offline HTML report
  {prog} COMMAND --help                                          a command's own options

--set takes dotted keys into the config, values parsed as YAML; --unset removes a key:
  --set model.params.batch_size=4 --set job.output_dir=outputs/run2
  --set model.class_path=multi_gpu --unset model.params.device --set 'model.params.device_ids=[cpu,cpu]'
(quote a value with brackets: zsh reads an unquoted one as a file pattern)
Relative paths in the config are read from {base}.
"""


class _Edit(argparse.Action):
    """--set and --unset into one ordered list, so a later edit wins over an earlier one."""

    def __call__(self, parser, namespace, value, option_string=None):
        edits = list(getattr(namespace, self.dest, None) or [])
        edits.append(("unset" if option_string == "--unset" else "set", value))
        setattr(namespace, self.dest, edits)


def _config_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--set", dest="edits", action=_Edit, default=[], metavar="KEY=VALUE",
                    help="set a config value (dotted key, value parsed as YAML; repeatable)")
    ap.add_argument("--unset", dest="edits", action=_Edit, metavar="KEY",
                    help="remove a config key (dotted; repeatable), e.g. model.params.device")


def _load(args: argparse.Namespace, base: Path | None = None) -> dict:
    """The config, edited by --set/--unset. `base`: the folder the config's relative paths are read
    from; a --config path that is not in the current folder but is there is named, not guessed."""
    from src.models.reward.config import ConfigError, apply_override, load_config, remove_key

    given = Path(args.config)
    if base is not None and not given.is_absolute() and not given.is_file() and (base / given).is_file():
        raise ConfigError(f"config file not found: {given} (read from the current folder, {Path.cwd()}); "
                          f"{_shown(base / given)} is there: give that path, or run from {base}")
    cfg = load_config(args.config)
    for op, text in args.edits:
        if op == "set":
            apply_override(cfg, text)
        else:
            remove_key(cfg, text)
    return cfg


def _shown(path: Path) -> str:
    """A path as the user can type it: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_run(argv: list[str], prog: str, base: Path, base_label: str) -> int:
    usage = (f"{prog} [run] --config CONFIG [--set KEY=VALUE] [--unset KEY] [--no-progress]\n"
             f"       {prog} serve --config CONFIG [--set KEY=VALUE] [--unset KEY]\n"
             f"       {prog} report RESULTS.jsonl [--out FILE.html] [--compare OTHER.jsonl]")
    ap = argparse.ArgumentParser(prog=prog, usage=usage, description="Run a scoring job (the default command).",
                                 epilog=_OVERVIEW.format(prog=prog, base=base_label),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(ap)
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars (the job's, nor the model's weight loading)")
    args = ap.parse_args(argv)
    if args.no_progress:
        # transformers reads this (through huggingface_hub) when imported, here and in workers.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    from src.job.runner import FINAL, REPORT, JobSpec, run_job

    raise_lost_ctrl_c()  # one that landed while importing; run_job looks again before each chunk
    try:
        cfg = _load(args, base)
        summary = run_job(cfg, base=base, progress=not args.no_progress)
    except JudgeError as e:  # the message names the device, PID, item and fix: no traceback
        return _report_error(e)
    except KeyboardInterrupt:
        try:
            where = _shown(JobSpec.from_config(cfg, base).output_dir)
        except Exception:  # interrupted before the config was read (or it names no folder)
            where = "the output folder"
        print(f"\ninterrupted: the judge stopped (its workers too, if it has any); the results so far are in "
              f"{where}, and running the same command again resumes", file=sys.stderr)
        return 130
    brief = {k: summary[k] for k in ("items", "scored", "failed", "score", "failures_by_kind", "resumed_from_disk")}
    spec = JobSpec.from_config(cfg, base)
    brief["results"] = _shown(spec.output_dir / FINAL)  # where they are; results.csv, summary.json beside
    if spec.report:
        brief["report"] = _shown(spec.output_dir / REPORT)
    print(json.dumps(brief, indent=2))
    if summary["items"] and not summary["scored"]:
        kinds = ", ".join(f"{k}: {n}" for k, n in summary["failures_by_kind"].items())
        first = (summary.get("failures") or [{}])[0]
        print(f"error: every item failed ({kinds}); the first: {first.get('error')}", file=sys.stderr)
        return 1
    return 0


def _report_error(e: JudgeError) -> int:
    """Print a judge error as one clean message (its traceback, if any, is inside it); the exit
    status says whose problem it is (2: what the user gave; 1: the machine or the service)."""
    if isinstance(e, JudgeStartError):  # a broken worker environment: its traceback is in the message
        print(f"error: {e.who} could not start: {e}", file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)
    return exit_code(e)


def cmd_serve(argv: list[str], prog: str, base: Path, base_label: str) -> int:
    ap = argparse.ArgumentParser(prog=f"{prog} serve", description="Serve a reward model over HTTP.",
                                 epilog=f"Relative server.allowed_dirs are read from {base_label}.")
    _config_args(ap)
    args = ap.parse_args(argv)
    try:
        from src.service.server import serve_from_config
    except ImportError as e:
        print(f"error: the HTTP service needs its extra packages ({e}); run setup_env.sh", file=sys.stderr)
        return 2
    raise_lost_ctrl_c()
    try:
        cfg = _load(args, base)
        return serve_from_config(cfg, base=base)
    except JudgeError as e:
        return _report_error(e)


def cmd_report(argv: list[str], prog: str, base: Path, base_label: str) -> int:
    try:
        from src.report.cli import main as report_main
    except ImportError as e:
        print(f"error: the report module is missing ({e})", file=sys.stderr)
        return 2
    return report_main(argv, prog=f"{prog} report")


class _PrintedAlready(logging.Filter):
    """Drops, at the root's handler, a record whose library prints it through a handler of its own
    and passes it up as well (huggingface_hub does): each warning once, not twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        top = logging.getLogger(record.name.split(".", 1)[0])
        return top is logging.getLogger() or not top.handlers


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _PrintedAlready) for f in handler.filters):
            handler.addFilter(_PrintedAlready())


def main(argv: list[str] | None = None, prog: str = "qwen-judge", base: Path | None = None) -> int:
    """Run one command. `base`: the folder relative config paths are read from (default: the
    current folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    label = "the current folder" if base is None else f"{base} (not the current folder)"
    base = Path.cwd() if base is None else Path(base)
    if argv and argv[0] in COMMANDS:
        cmd, rest = argv[0], argv[1:]
    else:
        cmd, rest = "run", argv
    try:
        return {"run": cmd_run, "serve": cmd_serve, "report": cmd_report}[cmd](rest, prog, base, label)
    except KeyboardInterrupt:  # before a command could handle it (while importing, reading the config)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # `python main.py` with a Python setup_env.sh did not build
        if (e.name or "").split(".")[0] in ("src", "standalone"):
            raise  # this project's own module: a bug, with its traceback
        print(f"error: this Python ({sys.executable}) lacks a package the command needs ({e}); run it with the "
              "project's environment, .venv/bin/python (bash setup_env.sh builds it)", file=sys.stderr)
        return 1


def console_main() -> int:
    """The `qwen-judge` console command (pyproject.toml)."""
    keep_lost_ctrl_c()  # as main.py does (its entry point imported this module first: a few quick imports)
    return main()
