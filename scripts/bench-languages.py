#!/usr/bin/env python3
"""Per-message and fresh-instance cost of the same `router` handler in every language, one run.

Usage (after the guests are built; the Rust one by `cargo test` or scripts/build-guests.sh, the
others by scripts/build-guest-<language>.sh):

    cargo build --release -p lockgate --bin lockgate
    scripts/bench-languages.py [path/to/lockgate]

For each router component it runs `lockgate test` on 500 routed messages (about 100 bytes each)
twice: reusing one instance, and with `--per-message` (a fresh instance for every message, so
the time is instantiation plus the call). It prints the median per-message time of each, and
the wall time of the run (dominated by compiling the component). Not a test: nothing is
asserted; compare rows of one run, the machine is noisy.
"""
import json, os, pathlib, statistics, subprocess, sys, tempfile, time

root = pathlib.Path(__file__).resolve().parent.parent
lockgate = sys.argv[1] if len(sys.argv) > 1 else str(
    pathlib.Path(os.environ.get("CARGO_TARGET_DIR", root / "target")) / "release" / "lockgate")
guests = pathlib.Path(os.environ.get("LOCKGATE_GUEST_OUT", pathlib.Path.home() / ".cache/lockgate/guests"))
target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
components = [
    ("Rust", target / "lockgate-guests/wasm32-wasip2/release/router.wasm"),
    ("C", guests / "c/router.wasm"),
    ("Go", guests / "go/router.wasm"),
    ("Python", guests / "python/router.wasm"),
    ("JavaScript (QuickJS)", guests / "js/router.wasm"),
    ("JavaScript (StarlingMonkey)", guests / "js-starlingmonkey/router.wasm"),
]

kinds = ["order", "refund", "survey"]
with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    for i in range(500):
        payload = {"kind": kinds[i % 3], "id": i, "customer": f"customer-{i % 97:04d}", "note": "x" * 40}
        f.write(json.dumps({"payload_json": payload, "key": f"k{i % 16}"}) + "\n")
    inputs = f.name

print("| language | size | wall of a run (compile) | per message, reused instance | per message, fresh instance |")
print("|---|---|---|---|---|")
for name, wasm in components:
    if not wasm.is_file():
        print(f"| {name} | not built ({wasm}) | | | |")
        continue
    cells = []
    for per_message in (False, True):
        args = [lockgate, "test", str(wasm), "-i", inputs, "--json",
                "-c", "route.order=orders", "-c", "route.refund=refunds", "-c", "default=misc"]
        if per_message:
            args.append("--per-message")
        started = time.time()
        out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "LOCKGATE_LOG": "error"})
        wall = time.time() - started
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        if len(rows) != 500 or any(r["outcome"] != "ok" for r in rows):
            sys.exit(f"{name}: unexpected outcomes\n{out.stdout[-500:]}\n{out.stderr[-500:]}")
        median_us = statistics.median(r["elapsed_ms"] for r in rows[1:]) * 1000
        cells.append((wall, median_us))
    size = wasm.stat().st_size
    size_text = f"{size / 1e6:.1f} MB" if size > 1e6 else f"{size / 1e3:.0f} KB"
    print(f"| {name} | {size_text} | {cells[0][0]:.1f} s | {cells[0][1]:.0f} µs | {cells[1][1]:.0f} µs |")
os.unlink(inputs)
