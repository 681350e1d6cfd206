#!/usr/bin/env python3
"""Load-test a running reward service: many concurrent clients, every answer checked.

    python main.py serve --config configs/server.yaml &
    python scripts/load_test.py --url http://127.0.0.1:8899 --clients 16 --requests 400

Each request carries a unique request id and unique item ids, and a distinct instruction; the
test fails when a request is lost, answered twice, or answered with another request's items.
Prints throughput and p50/p99 latency. Exit status 0 when every request was answered once.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time
from typing import Any


def default_image() -> str:
    """A small PNG as a data URL (no file needed on the service's side)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (56, 56), (240, 240, 240))
    ImageDraw.Draw(im).rectangle([12, 12, 44, 44], fill=(200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(n: int, image: str) -> dict[str, Any]:
    """Request n: one or two items (every third has two), each with its own id and instruction."""
    k = 2 if n % 3 == 0 else 1
    return {"request_id": f"r{n}",
            "items": [{"id": f"r{n}-i{j}", "images": [image], "instruction": f"a red square, variant {n}.{j}"}
                      for j in range(k)]}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[pos]


def run_load(url: str, clients: int = 16, requests: int = 400, token: str | None = None,
             image: str | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """Send `requests` /score requests from `clients` threads; check every answer."""
    import httpx

    image = image or default_image()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lock = threading.Lock()
    next_n = [0]
    answered: dict[str, int] = {}
    scores: dict[str, list[float | None]] = {}
    latencies: list[float] = []
    problems: list[str] = []
    items_done = [0]
    deadline = time.monotonic() + timeout_s

    def client_loop() -> None:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as http:
            while True:
                with lock:
                    n = next_n[0]
                    if n >= requests or time.monotonic() > deadline:
                        return
                    next_n[0] += 1
                body = request_body(n, image)
                t0 = time.perf_counter()
                try:
                    resp = http.post("/score", json=body)
                except httpx.HTTPError as e:
                    with lock:
                        problems.append(f"r{n}: {type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if resp.status_code != 200:
                        problems.append(f"r{n}: HTTP {resp.status_code}: {resp.text[:200]}")
                        continue
                    data = resp.json()
                    rid = data.get("request_id")
                    answered[rid] = answered.get(rid, 0) + 1
                    want = [it["id"] for it in body["items"]]
                    got = [r.get("id") for r in data.get("results", [])]
                    if rid != body["request_id"] or got != want:
                        problems.append(f"r{n}: sent {body['request_id']} {want}, answered {rid} {got}")
                    scores[body["request_id"]] = [r.get("score") for r in data.get("results", [])]
                    items_done[0] += len(got)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, name=f"load-client-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    sent = [f"r{n}" for n in range(min(next_n[0], requests))]
    lost = [rid for rid in sent if answered.get(rid, 0) == 0]
    twice = [rid for rid, c in answered.items() if c > 1]
    unknown = [rid for rid in answered if rid not in set(sent)]
    return {
        "clients": clients, "requests": requests, "sent": len(sent), "answered": sum(answered.values()),
        "lost": lost, "answered_twice": twice, "unknown_ids": unknown, "problems": problems,
        "items": items_done[0], "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else 0.0,
        "items_per_s": items_done[0] / wall if wall else 0.0,
        "p50_ms": 1000 * _percentile(latencies, 50), "p99_ms": 1000 * _percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
        "scores": scores,
    }


def summary_line(stats: dict[str, Any]) -> str:
    return (f"{stats['answered']}/{stats['requests']} requests ({stats['items']} items) from {stats['clients']} clients "
            f"in {stats['wall_s']:.1f}s: {stats['throughput_rps']:.1f} req/s, {stats['items_per_s']:.1f} items/s, "
            f"latency p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms; lost {len(stats['lost'])}, "
            f"answered twice {len(stats['answered_twice'])}, problems {len(stats['problems'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8899")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--token-env", default="REWARD_SERVICE_TOKEN", help="environment variable holding the token")
    ap.add_argument("--image", help="an image file to send (default: a generated 56x56 PNG)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    ap.add_argument("--json", action="store_true", help="print the full statistics as JSON")
    args = ap.parse_args(argv)
    image = None
    if args.image:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from src.service.wire import encode_image

        image = encode_image(args.image)
    stats = run_load(args.url, args.clients, args.requests, os.environ.get(args.token_env) or None, image, args.timeout)
    print(summary_line(stats))
    for p in stats["problems"][:10]:
        print("  problem:", p)
    if args.json:
        print(json.dumps({k: v for k, v in stats.items() if k != "scores"}, indent=2))
    ok = not stats["lost"] and not stats["answered_twice"] and not stats["problems"] and stats["answered"] == args.requests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
