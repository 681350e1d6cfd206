"""A newcomer's path through the README, as written: the package installed from pyproject.toml,
the Python API snippet run from a folder outside the repository, the `qwen-judge` command, the
config-error examples, and the curl example against the shipped server config.

Each check reads its example out of README.md, so the test fails when the README drifts from what
the code does. The install goes into a fresh venv of this test (editable, from this checkout, no
network), never into the shared .venv, so it checks pyproject.toml itself wherever it runs.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_until_gone
from service_proc import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of `text` whose fence names `lang` ("" for a bare fence)."""
    blocks, current, kind = [], None, None
    for line in text.splitlines():
        if line.startswith("```") and current is None:
            current, kind = [], line[3:].strip()
        elif line.startswith("```"):
            if kind == lang:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _command_lines(block: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing into this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with this checkout installed the way setup_env.sh does it (`pip install -e .
    --no-deps`), seeing the main environment's packages through a .pth file."""
    venv = tmp_path_factory.mktemp("newcomer") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    sites = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "main_env.pth").write_text("".join(p + "\n" for p in sites))
    py = venv / "bin" / "python"
    run = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "-e", str(ROOT)], capture_output=True, text=True, timeout=300,
                         env=_clean_env())
    assert run.returncode == 0, ("setup_env.sh's install step failed (requirements.txt pins the setuptools "
                                 "it builds with):\n" + run.stdout + run.stderr)
    assert (venv / "bin" / "qwen-judge").is_file(), "pyproject.toml declares the qwen-judge command"
    return venv


def test_readme_python_api_runs_from_a_folder_outside_the_repo(installed, tmp_path):
    snippet = _blocks(_section("Python API"), "python")[0]
    # The tiny judge on one CPU worker instead of a 7B checkpoint on four GPUs; nothing else changes.
    for real, tiny in [('"model_name": "Qwen/Qwen2.5-VL-7B-Instruct"', '"model_name": "tiny:judge"'),
                       ('"device_ids": [0, 1, 2, 3]', '"device_ids": ["cpu"]')]:
        assert real in snippet, f"the README's Python API snippet no longer has {real}"
        snippet = snippet.replace(real, tiny)
    work = tmp_path / "my_benchmark"  # the images the snippet names, relative to its folder
    demo = ROOT / "data" / "demo" / "images"
    for k, n in enumerate(["00", "04"], start=1):
        for folder, kind in (("out", "edited"), ("src", "source")):
            (work / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(demo / f"{n}_{kind}.png", work / folder / f"{k}.png")
    (work / "bench.py").write_text(snippet)
    proc = subprocess.Popen([str(installed / "bin" / "python"), "bench.py"], cwd=work, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert wait_until_gone([proc.pid], timeout=15) == [], "the snippet's workers outlived it"
    lines = out.splitlines()
    assert len(lines) == 3, out  # two items in parallel lists, then one ScoreItem: one line each, in order
    ids = [line.split()[0] for line in lines]
    assert ids == ["None", "None", "1"], out
    scores = [float(line.split()[1]) for line in lines]
    assert all(0.0 <= s <= 9.0 for s in scores), out
    assert abs(scores[0] - scores[2]) < 1e-4, "the same item scored twice gives the same score"
    assert all(" cpu" in line and "semantic_consistency" in line for line in lines), out


def test_qwen_judge_command_runs_the_readme_multi_gpu_switch(installed, tmp_path):
    """The README's --unset example: the demo moved to two CPU worker processes from the command
    line alone, through the installed console command; --no-progress hides every bar."""
    config = _section("A config")
    line = next(c for b in _blocks(config, "bash") for c in _command_lines(b) if "--unset" in c)
    assert line.startswith(".venv/bin/qwen-judge run "), line
    # A bracketed value is quoted: zsh (macOS's shell, many Linux users') refuses an unquoted one
    # ("no matches found"), as it would any word with [ ] that matches no file.
    assert all("[" not in word or word[0] in "'\"" for word in line.split()), line
    args = shlex.split(line)[1:] + ["--set", f"job.output_dir={tmp_path / 'out'}", "--no-progress"]
    proc = subprocess.Popen([str(installed / "bin" / "qwen-judge"), *args], cwd=ROOT, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    run = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert run.returncode == 0, run.stderr[-3000:]
    assert wait_until_gone([proc.pid], timeout=15) == [], "the job's workers outlived it"
    brief = json.loads(run.stdout)
    assert brief["items"] == 11 and brief["scored"] == 11, brief
    assert brief["results"] == str(tmp_path / "out" / "results.jsonl")
    devices = {json.loads(x)["device"] for x in (tmp_path / "out" / "results.stream.jsonl").read_text().splitlines()}
    assert devices == {"cpu#0", "cpu#1"}, devices
    assert "Loading weights" not in run.stderr and "it/s" not in run.stderr, run.stderr[-2000:]


def test_readme_template_examples_resolve():
    """Every YAML block of the README that defines templates: each name it defines resolves, as
    `model.params.template`, to a rubric (a rubric whose parts do not share a scale is refused)."""
    import yaml

    from src.models.reward.templates import resolve_rubric

    blocks = [yaml.safe_load(b) for b in _blocks(README, "yaml") if b.lstrip().startswith("templates:")]
    assert blocks, "the README's template example is gone"
    for block in blocks:
        for name in block["templates"]:
            assert resolve_rubric(name, block["templates"]).parts


def test_readme_config_error_examples_print_what_the_cli_prints(tmp_path, capsys):
    """Each `$ command` / `error: ...` pair of the README (`...` stands for the rest of the
    line); every one stops before any model loads, so no output folder appears."""
    from src.cli import main

    block = next(b for b in _blocks(_section("A config"), "") if b.lstrip().startswith("$ "))
    pairs = re.findall(r"^\$ (.+)\n(error: .+)$", block, flags=re.M)
    assert len(pairs) >= 3, block
    for command, expected in pairs:
        argv = command.split()
        assert argv[:2] == [".venv/bin/python", "main.py"], command
        out = tmp_path / re.sub(r"\W", "_", command)[-40:]
        rc = main(argv[2:] + ["--set", f"job.output_dir={out}"], prog="main.py", base=ROOT)
        printed = capsys.readouterr().err.strip().splitlines()[-1]
        pattern = ".*".join(re.escape(part) for part in expected.split("..."))
        assert rc == 2 and re.fullmatch(pattern, printed), f"{command}\nREADME: {expected}\nCLI:    {printed}"
        assert not out.exists(), f"{command}: the job started before the error"


def _served_lines() -> list[str]:
    """'Served judges': the line that starts the service (its trailing `&` and comment dropped) and
    the job through the endpoint."""
    serve, job = _command_lines(_blocks(_section("Served judges: vLLM, SGLang, hosted APIs"), "bash")[0])
    return [serve.split("&")[0].strip(), job.split("#")[0].strip()]


@pytest.fixture(scope="module")
def readme_service(tiny_cache):
    """The README's reward service, `main.py serve --config configs/server.yaml`, on a free loopback
    port (server.port=0). 'Served judges' starts it with --set overrides that repeat the config's own
    values, so that one service is the one both sections run against; it must stop cleanly."""
    import yaml

    words = shlex.split(_served_lines()[0])
    assert words[:5] == [".venv/bin/python", "main.py", "serve", "--config", "configs/server.yaml"], words
    config = yaml.safe_load((ROOT / "configs" / "server.yaml").read_text())
    for key, value in (w.split("=", 1) for k, w in enumerate(words) if words[k - 1] == "--set"):
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value), f"'Served judges' serves another judge than configs/server.yaml: {key}"
    svc = ServiceProcess([]).start()
    yield svc
    rc = svc.stop()
    assert rc == 0, svc.log()


def test_readme_curl_example_against_the_shipped_server_config(readme_service):
    """The 'Reward service' section's curl requests, then its load-test command, as written."""
    block = _blocks(_section("Reward service and RL hooks"), "bash")[0]
    lines = _command_lines(block)
    assert lines[0] == ".venv/bin/python main.py serve --config configs/server.yaml", lines[0]
    port = readme_service.url.rsplit(":", 1)[1]
    answers = []
    for line in lines[1:]:
        assert line.startswith("curl ") and "http://127.0.0.1:8899/" in line, line
        line = line.replace("127.0.0.1:8899", f"127.0.0.1:{port}")
        if shutil.which("curl"):
            run = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            answers.append(json.loads(run.stdout))
        else:  # the same request through an HTTP client
            import httpx

            url = re.search(r"(http://\S+)", line).group(1)
            body = re.search(r"-d '(.*)'", line)
            resp = (httpx.post(url, content=body.group(1), headers={"Content-Type": "application/json"}, timeout=120)
                    if body else httpx.get(url, timeout=30))
            answers.append(resp.json())
    health, scored = answers
    assert health["ready"] is True
    results = {r["id"]: r for r in scored["results"]}
    assert [r["error"] for r in results.values()] == [None, None], scored
    # What the README says: the clean shape about 8.4, the one 80% covered in noise about 0.5.
    said = dict(re.findall(r"(clean|noisy)\b[^.]*? about (\d+\.\d)", _section("Reward service and RL hooks")))
    for key, value in said.items():
        assert abs(results[key]["score"] - float(value)) < 0.5, (key, results[key]["score"], value)
    assert set(said) == {"clean", "noisy"}, said

    load = re.search(r"`(\.venv/bin/python scripts/load_test\.py [^`]*)`", _section("Reward service and RL hooks"))
    assert load and "--url http://127.0.0.1:8899 " in load.group(1), "the README's load test is gone"
    argv = shlex.split(load.group(1).replace("127.0.0.1:8899", f"127.0.0.1:{port}"))[1:]
    run = subprocess.run([sys.executable, *argv], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "lost 0, answered twice 0, problems 0" in run.stdout, run.stdout + run.stderr


def _readme_cli(line: str, outputs: Path) -> list[str]:
    """A README command line `.venv/bin/python main.py ...` as arguments of src.cli.main, with the
    `outputs/` folder it names moved to `outputs` (a folder of the test)."""
    argv = shlex.split(line.replace("outputs/", f"{outputs}/"))
    assert argv[:2] == [".venv/bin/python", "main.py"], line
    return argv[2:]


def test_readme_served_judge_examples_run_against_the_readme_service(readme_service, tmp_path, capsys):
    """'Served judges' against the service its line starts: as written, the OpenAI client snippet
    ('The service speaks OpenAI's protocol too') and the demo through the endpoint
    (configs/openai.yaml)."""
    from src.cli import main

    port = readme_service.url.rsplit(":", 1)[1]
    snippet = _blocks(_section("Reward service and RL hooks"), "python")[0]
    assert "http://127.0.0.1:8899/v1" in snippet, snippet
    run = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:8899", f"127.0.0.1:{port}")],
                         cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    token, logprobs = run.stdout.strip().split(" ", 1)
    assert token in "0123456789" and len(ast.literal_eval(logprobs)) == 10, run.stdout  # the first answer token, its top 10

    argv = _readme_cli(_served_lines()[1], tmp_path)
    assert argv == ["--config", "configs/openai.yaml"], argv
    argv += ["--set", f"model.params.base_url=http://127.0.0.1:{port}/v1", "--set",
             f"job.output_dir={tmp_path / 'demo_openai'}", "--no-progress"]
    assert main(argv, prog="main.py", base=ROOT) == 0, capsys.readouterr().err[-3000:]
    brief = json.loads(capsys.readouterr().out)
    assert brief["items"] == brief["scored"] == 11, brief


def test_workers_of_a_plain_install_get_the_code_without_its_site_packages(tmp_path):
    """Installed as a plain (non-editable) package, the code sits in a site-packages: a worker in
    another environment must get `src` and `standalone` from it, not that env's torch."""
    from src.models.reward.implementations.multi_gpu import worker_pythonpath

    assert worker_pythonpath().split(os.pathsep)[0] == str(ROOT)  # a checkout: the checkout itself
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    for name in ("src", "standalone"):
        (site / name).symlink_to(ROOT / name)
    (site / "torch").mkdir()  # what must stay out of the worker's path
    (site / "torch" / "__init__.py").write_text("raise ImportError('the main env torch')\n")
    first = Path(worker_pythonpath(site).split(os.pathsep)[0])
    try:
        assert first != site and sorted(p.name for p in first.iterdir()) == ["src", "standalone"]
        assert first.joinpath("src").resolve() == ROOT / "src"
        probe = subprocess.run([sys.executable, "-c", "import src.models.reward.messages, torch; print('ok')"],
                               env={**_clean_env(), "PYTHONPATH": str(first)}, capture_output=True, text=True,
                               timeout=120)
        assert probe.stdout.strip() == "ok", probe.stderr
    finally:
        shutil.rmtree(first, ignore_errors=True)


def test_setup_run_with_sh_runs_under_bash():
    """`sh setup_env.sh` (the README says bash): where sh is dash (Debian, Ubuntu) the script stopped at
    once with 'set: Illegal option -o pipefail'; it now runs itself with bash. An unknown option is
    the quickest thing it answers without building anything."""
    run = subprocess.run(["sh", str(ROOT / "setup_env.sh"), "--no-such-option"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stderr == "setup_env.sh: unknown option --no-such-option\n", run.stderr


@pytest.mark.skipif(shutil.which("conda") is not None, reason="conda is here: --pack would build and pack")
def test_setup_pack_without_conda_stops_before_building_anything():
    # Checked first, not after both environments were built (minutes) or brought up to date.
    run = subprocess.run(["bash", str(ROOT / "setup_env.sh"), "--ray", "--pack"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.startswith("setup_env.sh --pack: conda-pack needs conda (install Miniforge)"), run.stderr


# -- setup_env.sh run again over what an earlier run left behind ---------------------------------
# Each test runs the real script in a copy of this checkout's setup files whose requirement files
# hold no packages (pip runs offline: PIP_NO_INDEX), with the main env already up to date by its
# stamps, so what is checked is how the script treats the worker venv it finds.

def _python_minor(python: str) -> str | None:
    """`3.11` for an interpreter that runs, else None."""
    try:
        run = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _other_python(older: bool) -> str | None:
    """An interpreter on PATH of another minor version than this one (older than 3.11 when
    `older`), or None."""
    this = sys.version_info[:2]
    for minor in range(20, 7, -1):
        found = shutil.which(f"python3.{minor}")
        version = found and _python_minor(found)
        if version and tuple(map(int, version.split("."))) != this and (minor < 11) == older:
            return found
    return None


def _stamp(venv: Path, name: str, *files: Path, prefix: bytes = b"") -> None:
    """The stamp setup_env.sh writes once `files` are installed (sha256 of their text)."""
    import hashlib

    (venv / name).write_text(hashlib.sha256(prefix + b"".join(f.read_bytes() for f in files)).hexdigest() + "\n")


def _setup_copy(tmp_path: Path, name: str = "repo") -> tuple[Path, dict[str, str]]:
    """setup_env.sh in a folder of its own, with empty requirement files and a main env that is
    up to date, and the environment to run it in (no network, no apt-get, this Python)."""
    repo = tmp_path / name
    repo.mkdir()
    shutil.copy(ROOT / "setup_env.sh", repo)
    shutil.copy(ROOT / "pyproject.toml", repo)
    for name in ("requirements.txt", "requirements-worker.txt", "requirements-rl.txt",
                 "requirements-rl-compat.txt", "requirements-quant.txt"):
        (repo / name).write_text("# nothing to install in this test\n")
    venv = repo / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    (venv / "bin" / "qwen-judge").write_text("#!/bin/sh\n")
    (venv / "bin" / "qwen-judge").chmod(0o755)
    _stamp(venv, ".requirements.sha256", repo / "requirements.txt", repo / "requirements-worker.txt")
    _stamp(venv, ".install.sha256", repo / "pyproject.toml", prefix=f"{repo}\n".encode())
    _stamp(venv, ".requirements-rl.sha256", repo / "requirements-rl.txt", repo / "requirements-rl-compat.txt")
    _stamp(venv, ".requirements-quant.sha256", repo / "requirements-quant.txt")
    fake_bin = tmp_path / "bin"  # the script's best-effort browser install must not run apt-get here
    fake_bin.mkdir()
    (fake_bin / "apt-get").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "apt-get").chmod(0o755)
    env = {**_clean_env(), "PYTHON": sys.executable, "PIP_NO_INDEX": "1",
           "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    return repo, env


def _run_setup(repo: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "setup_env.sh")], cwd=cwd or repo, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(shutil.which("conda") is not None, reason="conda is here: the worker env is a conda env")
def test_setup_after_an_interrupted_venv_builds_it_again(tmp_path):
    """A Ctrl-C in the first seconds of `python -m venv` (before ensurepip finished) leaves a venv
    whose python has no pip: every later run then failed at once with 'No module named pip'."""
    repo, env = _setup_copy(tmp_path)
    worker = repo / ".venv-worker"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(worker)], check=True, timeout=120)
    run = _run_setup(repo, env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[setup_env] .venv is up to date" in run.stdout, run.stdout
    assert f"[setup_env] rebuilding .venv-worker with Python {'%d.%d' % sys.version_info[:2]} ({sys.executable}): " \
        "it has no pip" in run.stdout, run.stdout
    probe = subprocess.run([str(worker / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert (worker / ".requirements.sha256").is_file()
    assert "[setup_env] installing requirements-worker.txt into .venv-worker (the first time: minutes" in run.stdout
    again = _run_setup(repo, env)  # and then it is up to date: nothing rebuilt
    assert again.returncode == 0 and "[setup_env] .venv-worker is up to date" in again.stdout, again.stdout


@pytest.mark.skipif(shutil.which("conda") is not None, reason="conda is here: the worker env is a conda env")
@pytest.mark.skipif(_other_python(older=False) is None, reason="no Python of another version on PATH")
def test_setup_does_not_call_a_venv_of_another_python_up_to_date(tmp_path):
    """A venv made by another Python than the PYTHON the caller sets (an earlier run with another
    python3) is built again with PYTHON and its packages installed again, not reused because its
    stamp matches."""
    repo, env = _setup_copy(tmp_path)
    worker = repo / ".venv-worker"
    other = _other_python(older=False)
    subprocess.run([other, "-m", "venv", str(worker)], check=True, timeout=300)
    _stamp(worker, ".requirements.sha256", repo / "requirements-worker.txt")  # as if installed there
    run = _run_setup(repo, env)
    assert run.returncode == 0, run.stdout + run.stderr
    this = "%d.%d" % sys.version_info[:2]
    assert (f"[setup_env] rebuilding .venv-worker with Python {this} ({sys.executable}): it is Python "
            f"{_python_minor(other)}" in run.stdout), run.stdout
    assert _python_minor(str(worker / "bin" / "python")) == this


@pytest.mark.skipif(shutil.which("conda") is not None, reason="conda is here: the worker env is a conda env")
@pytest.mark.skipif(_other_python(older=True) is None, reason="no Python older than 3.11 on PATH")
def test_setup_with_a_python_older_than_the_pins_stops_before_building(tmp_path):
    """PYTHON=python3.10 (Ubuntu 22.04's python3): the reason and the fix before any venv is made,
    instead of pip's 'No matching distribution found for pillow==...' in a venv later runs reused.
    Venvs already built with a newer Python stay in use by a plain rerun with such a python3."""
    repo, env = _setup_copy(tmp_path)
    old = _other_python(older=True)
    run = _run_setup(repo, {**env, "PYTHON": old})  # the main env is there: rebuilt with PYTHON, which is refused
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr == (f"setup_env.sh: '{old}' is Python {_python_minor(old)}; the environments need Python 3.11 "
                          "or newer.\n  Install it and run: PYTHON=python3.11 bash setup_env.sh\n"), run.stderr
    assert not (repo / ".venv-worker").exists() and (repo / ".venv" / ".requirements.sha256").is_file()
    assert _run_setup(repo, env).returncode == 0  # built with this Python
    python3_is_old = tmp_path / "old-bin"
    python3_is_old.mkdir()
    (python3_is_old / "python3").symlink_to(old)
    plain = {k: v for k, v in env.items() if k != "PYTHON"}
    plain["PATH"] = f"{python3_is_old}{os.pathsep}{plain['PATH']}"
    again = _run_setup(repo, plain)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[setup_env] .venv is up to date" in again.stdout and "[setup_env] .venv-worker is up to date" in again.stdout


@pytest.mark.skipif(shutil.which("conda") is not None, reason="conda is here: the worker env is a conda env")
def test_setup_run_from_another_folder_prints_a_next_command_that_runs_there(tmp_path):
    """`bash ~/my repo/setup_env.sh` from another folder: the closing line's command, pasted where the
    script was run, goes to the checkout first (its path quoted for the shell), then runs the demo."""
    repo, env = _setup_copy(tmp_path, "my repo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _run_setup(repo, env, cwd=elsewhere)
    assert run.returncode == 0, run.stdout + run.stderr
    ready = run.stdout.splitlines()[-1]
    assert ready.startswith("[setup_env] ready: cd "), ready
    command = ready[len("[setup_env] ready: "):].split("   (or")[0]
    assert command.endswith(" && .venv/bin/python main.py --config configs/demo.yaml"), command
    # what the line would run, with the demo swapped for a look at where it runs
    probe = command.replace(".venv/bin/python main.py --config configs/demo.yaml", "pwd && ls .venv/bin/python")
    where = subprocess.run(["bash", "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0 and where.stdout.splitlines()[0] == str(repo), where.stdout + where.stderr
    same = _run_setup(repo, env)  # run from the checkout itself: the command as the README gives it
    assert same.stdout.splitlines()[-1].startswith("[setup_env] ready: .venv/bin/python main.py "), same.stdout


def test_readme_report_commands_run_as_written(tmp_path, capsys):
    """The Report section's commands in order, after the demo job (the README's first command): the
    demo's report, the two runs that --compare reads, and the comparison. Each exits 0 and writes
    the file the README says; the compared runs were named but never made before."""
    from src.cli import main

    outputs = tmp_path / "outputs"
    demo = _readme_cli(".venv/bin/python main.py --config configs/demo.yaml --no-progress", outputs)
    assert main(demo + ["--set", f"job.output_dir={outputs}/demo"], prog="main.py", base=ROOT) == 0
    lines = [c for c in _command_lines(_blocks(_section("Report: see what the judge did"), "bash")[0])
             if not c.startswith("#")]
    assert any("--compare" in c for c in lines), lines
    for line in lines:
        argv = _readme_cli(line, outputs)
        rc = main(argv + (["--no-progress"] if argv[0] != "report" else []), prog="main.py", base=ROOT)
        assert rc == 0, f"{line}\n{capsys.readouterr().err[-2000:]}"
    assert (outputs / "demo" / "report.html").is_file()  # --out report.html: beside the results
    compared = next(Path(c.split()[3].replace("outputs/", f"{outputs}/")).parent / c.split()[-1]
                    for c in lines if "--compare" in c)
    page = compared.read_text()
    assert "Spearman" in page and "Compared with" in page, compared


def test_every_import_the_readme_shows_runs():
    """Each `from ... import ...` the README's text shows (outside its code blocks) imports, in a
    fresh interpreter: the names a reader copies into a script exist where the README says."""
    shown = re.findall(r"`(from [\w.]+ import [\w, ]+)`", README)
    assert any("QwenVLRewardModel" in s for s in shown), "the README does not say where the classes live"
    for line in shown:
        run = subprocess.run([sys.executable, "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{line}\n{run.stderr[-2000:]}"


def test_the_readme_lists_every_judge_setting():
    """The README's paragraph of judge settings names each field of JudgeSettings,
    so a setting a config accepts is not missing from the README's list."""
    from src.models.reward.settings import JudgeSettings

    start = README.index("Judge settings (the same for `qwen_vl`")
    listed = set(re.findall(r"`(\w+)`", README[start:README.index("\n\n", start)]))
    missing = [name for name in JudgeSettings.names() if name not in listed]
    assert not missing, f"the README's list of judge settings lacks {missing}"


def test_the_readme_names_every_job_key():
    """A job config's keys (unknown ones are errors) are each named in the README's 'A config'."""
    from src.job.runner import JOB_KEYS

    missing = [key for key in JOB_KEYS if f"`{key}`" not in _section("A config") and f"{key}:" not in _section("A config")]
    assert not missing, f"the README's 'A config' does not name the job keys {missing}"


def test_every_readme_config_passes_the_config_checks():
    """Each YAML block of the README that holds a `model` passes the checks a job makes before it
    builds anything (classes, parameters, template), and its `job`, if any, those of a job; none is
    built here (they name GPUs, clusters and checkpoints)."""
    import yaml

    from src.job.runner import JobSpec, check_top_level
    from src.models.reward.config import ConfigError, resolve_spec

    configs = [yaml.safe_load(b) for b in _blocks(README, "yaml") if b.startswith("model:")]
    assert len(configs) >= 4, configs
    for cfg in configs:
        try:
            resolve_spec(cfg["model"])
            if "job" in cfg:
                check_top_level(cfg)
                JobSpec.from_config(cfg, ROOT)
        except ConfigError as e:
            pytest.fail(f"the README's config for {cfg['model'].get('class_path')!r}: {e}")
