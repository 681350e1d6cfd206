#!/usr/bin/env python3
"""Measure how long a 1-item request waits while a large request holds the reward service.

    python scripts/fair_share.py --big 10000 --out benchmarks/results/fair_share.json

Starts `main.py serve` (configs/server.yaml: the tiny judge on the CPU, unless --config says
otherwise) on a free loopback port, then:

1. baseline: 1-item requests one after another, nothing else running;
2. under load: one request of --big items (paths to a small PNG, so the body stays small) and,
   beside it, 1-item requests one after another until the big one is answered.

Prints and writes p50 / p99 / max latency of the 1-item requests in both phases, the big
request's time, and checks every answer (each request answered once, with its own items).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _summary(latencies: list[float]) -> dict:
    return {"requests": len(latencies), "p50_s": round(_pct(latencies, 50), 4), "p99_s": round(_pct(latencies, 99), 4),
            "max_s": round(max(latencies), 4), "mean_s": round(statistics.mean(latencies), 4)}


def _start(root: Path, config: str, folder: str, big: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "main.py", "serve", "--config", config, "--set", "server.port=0",
           "--set", f"server.allowed_dirs=[{folder}]", "--set", f"server.max_batch={max_batch}"]
    if root == ROOT:  # another checkout (an older version, for a before/after) may have no max_items
        cmd += ["--set", f"server.max_items={big}"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    url = None
    for line in proc.stdout:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise SystemExit(f"the service did not start (exit {proc.wait()})")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its log
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the service did not become ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/server.yaml")
    ap.add_argument("--big", type=int, default=10000, help="items in the large request")
    ap.add_argument("--baseline", type=int, default=50, help="1-item requests in the baseline phase")
    ap.add_argument("--max-batch", type=int, default=32, help="server.max_batch")
    ap.add_argument("--big-alone", action="store_true", help="also time the big request alone, first")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose main.py serves (default: this one)")
    ap.add_argument("--out", help="write the figures here as JSON (and a .md table beside it)")
    args = ap.parse_args()

    import httpx
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(ROOT))
    from src.service.wire import data_url

    folder = tempfile.mkdtemp(prefix="fair_share-")
    im = Image.new("RGB", (56, 56), (240, 240, 240))
    ImageDraw.Draw(im).rectangle([12, 12, 44, 44], fill=(200, 30, 30))
    im.save(Path(folder) / "square.png")
    small_image = data_url((Path(folder) / "square.png").read_bytes())
    proc, url = _start(Path(args.root).resolve(), args.config, folder, args.big, args.max_batch)
    problems: list[str] = []
    try:
        with httpx.Client(base_url=url, timeout=3600) as client:
            def one(n: int) -> float:
                t0 = time.perf_counter()
                resp = client.post("/score", json={"request_id": f"s{n}", "items": [
                    {"id": f"s{n}", "images": [small_image], "instruction": "a red square"}]})
                dt = time.perf_counter() - t0
                out = resp.json()
                if resp.status_code != 200 or out["request_id"] != f"s{n}" or [r["id"] for r in out["results"]] != [f"s{n}"]:
                    problems.append(f"small request {n}: {resp.status_code} {resp.text[:200]}")
                return dt

            one(-1)  # warm-up
            baseline = [one(n) for n in range(args.baseline)]

            big_body = {"request_id": "big", "items": [
                {"id": f"b{k}", "images": [str(Path(folder) / "square.png")], "instruction": f"a red square {k}"}
                for k in range(args.big)]}
            big_answer: dict = {}

            def send_big() -> None:
                t0 = time.perf_counter()
                with httpx.Client(base_url=url, timeout=3600) as c:
                    resp = c.post("/score", json=big_body)
                big_answer.update(status=resp.status_code, seconds=time.perf_counter() - t0, body=resp.json())

            big_alone = None
            if args.big_alone:  # the big request with nothing beside it: what sharing costs it
                send_big()
                big_alone = big_answer["seconds"]
            t = threading.Thread(target=send_big)
            t.start()
            def busy() -> bool:
                h = httpx.get(url + "/health").json()
                return h["queue_depth"] > 0 or h["in_flight"] > 0

            while not busy() and t.is_alive():
                time.sleep(0.05)  # the big request is queued or being scored: start the small ones beside it
            loaded, n = [], 0
            while t.is_alive():
                loaded.append(one(10_000 + n))
                n += 1
            t.join()
            results = big_answer["body"].get("results", [])
            if big_answer["status"] != 200 or [r["id"] for r in results] != [f"b{k}" for k in range(args.big)]:
                problems.append(f"the big request: {big_answer['status']}, {len(results)} results")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)

    report = {
        "command": "python scripts/fair_share.py " + " ".join(sys.argv[1:]),
        "config": args.config, "max_batch": args.max_batch, "big_items": args.big,
        "root": "this checkout" if Path(args.root).resolve() == ROOT else args.root,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "baseline_1_item": _summary(baseline),
        "beside_big_1_item": _summary(loaded) if loaded else None,
        "big_request_s": round(big_answer["seconds"], 2),
        "big_request_alone_s": None if big_alone is None else round(big_alone, 2),
        "problems": problems,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        b, l = report["baseline_1_item"], report["beside_big_1_item"] or {}
        out.with_suffix(".md").write_text(
            f"# 1-item requests beside a {args.big}-item request\n\n`{report['command']}` "
            f"({args.config}, max_batch {args.max_batch}; {report['machine']})\n\n"
            "| 1-item requests | n | p50 s | p99 s | max s |\n|---|---|---|---|---|\n"
            f"| alone | {b['requests']} | {b['p50_s']} | {b['p99_s']} | {b['max_s']} |\n"
            f"| beside the big request | {l.get('requests')} | {l.get('p50_s')} | {l.get('p99_s')} | {l.get('max_s')} |\n\n"
            f"The {args.big}-item request took {report['big_request_s']} s beside the 1-item requests"
            + (f" ({report['big_request_alone_s']} s alone)" if big_alone is not None else "")
            + f". Problems: {problems or 'none'}.\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
