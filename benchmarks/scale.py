"""Scale in images: time and peak memory of the engine against the number of images.

    python benchmarks/scale.py            # 512 .. 4096 images, ViT-S/16 at 224 px (about 6 minutes)
    python benchmarks/scale.py --quick    # 256 .. 1024 images (about 2 minutes)

A ViT-S/16-sized bank (timm ``vit_small_patch16_224``, random weights, 4 blocks: 197 x 384
activations, ~0.3 MB per image per cached prefix; the images ~0.6 MB each) scores the same 3
orders (5 distinct prefixes) on N images, each N in a fresh process, two ways:

- **shards**: the images memory-mapped from a ``.npy`` file (``EvalSet.from_npy``) and the
  engine's automatic shards under a 256 MiB cache budget;
- **whole**: the images in memory and no shards (``shard_images=0``), as before.

Peak memory is the process's anonymous resident memory (``RssAnon``, sampled every 10 ms;
a memory-mapped file's pages are the page cache's, not the process's) above what it held
before the engine was built. Writes its section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import proc_status, write_section  # noqa: E402

BANK = ("timm:vit_small_patch16_224", dict(depth=4, num_classes=10))
ORDERS = ["0-1", "0-2", "1-0"]
BUDGET = 256 * 2**20
BATCH = 32


def write_images(path: Path, n: int) -> None:
    """``n`` random 224 px images as float32 (N, 3, 224, 224), written 256 at a time."""
    import numpy as np
    from numpy.lib.format import open_memmap

    out = open_memmap(path, "w+", np.float32, (n, 3, 224, 224))
    rng = np.random.default_rng(0)
    for a in range(0, n, 256):
        b = min(a + 256, n)
        out[a:b] = rng.standard_normal((b - a, 3, 224, 224), dtype=np.float32)
    out.flush()
    del out


def one(path: Path, mode: str) -> dict:
    """Score ``ORDERS`` on the images in ``path`` (run in a fresh process)."""
    import numpy as np
    import torch

    from ordersearch import load_bank
    from ordersearch.engine import Engine
    from ordersearch.evalset import EvalSet

    bank = load_bank(BANK[0], **BANK[1])
    n = int(np.load(path, mmap_mode="r").shape[0])
    y = torch.arange(n) % 10
    base = proc_status("RssAnon")
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc_status("RssAnon"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "shards":
        es = EvalSet.from_npy(path, y)
        engine = Engine(bank, es, "probe", cache_bytes=BUDGET, batch_size=BATCH, device="cpu")
    else:
        es = EvalSet(torch.from_numpy(np.load(path)), y)
        engine = Engine(bank, es, "probe", cache_bytes=BUDGET, batch_size=BATCH, device="cpu", shard_images=0)
    scores = engine.evaluate(ORDERS)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    level = engine._levels[n]
    return {"n": n, "mode": mode, "seconds": seconds, "peak": peak[0] - base,
            "live": engine.stats.live_bytes_peak, "shards": len(level.shards or [level]),
            "block_seconds": engine.stats.block_seconds, "ok": all(s.ok for s in scores),
            "values": [s.value for s in scores]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--one", nargs=2, metavar=("NPY", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1])))
        return
    sizes = [256, 512, 1024] if args.quick else [512, 1024, 2048, 4096]
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"x{n}.npy"
            write_images(path, n)
            runs = {}
            for mode in ("shards", "whole"):
                res = subprocess.run([sys.executable, __file__, "--one", str(path), mode], capture_output=True,
                                     text=True)
                if res.returncode:
                    raise SystemExit(f"{mode} at {n} images failed: {res.stderr.strip().splitlines()[-1]}")
                runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
                r = runs[mode]
                print(f"{n:5d} {mode:6s} {r['seconds']:6.1f} s  peak {r['peak'] / 2**20:7.0f} MiB  "
                      f"live {r['live'] / 2**20:6.0f} MiB  shards {r['shards']}", flush=True)
            same = runs["shards"]["values"] == runs["whole"]["values"]
            rows.append((n, runs, same))
            path.unlink()
    first = rows[0]
    lines = [
        "## Engine: scale in images\n",
        f"Command: `python benchmarks/scale.py{' --quick' if args.quick else ''}` · "
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} · {platform.platform()} · {os.cpu_count()} CPUs. "
        f"Bank {BANK[0]} with {BANK[1]['depth']} blocks (random weights; 197 x 384 activations), probe objective, "
        f"orders {', '.join(ORDERS)} (5 distinct prefixes), cache budget {BUDGET // 2**20} MiB, batch {BATCH}, "
        "each N in a fresh process. *shards*: images memory-mapped from a .npy file (`EvalSet.from_npy`) and "
        "the engine's automatic shards; *whole*: images in memory, no shards (`shard_images=0`). Peak = anonymous "
        "resident memory (RssAnon) above the process's before the engine; engine live = its activation buffers "
        "(cache + path + stem outputs).\n",
        "| images | shards | time shards / whole | s per 1k images shards / whole | peak shards / whole | "
        "engine live shards / whole | scores identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, runs, same in rows:
        s, w = runs["shards"], runs["whole"]
        lines.append(f"| {n} | {s['shards']} | {s['seconds']:.1f} / {w['seconds']:.1f} s | "
                     f"{1e3 * s['seconds'] / n:.2f} / {1e3 * w['seconds'] / n:.2f} | "
                     f"{s['peak'] / 2**20:.0f} / {w['peak'] / 2**20:.0f} MiB | "
                     f"{s['live'] / 2**20:.0f} / {w['live'] / 2**20:.0f} MiB | {'yes' if same else 'NO'} |")
    last = rows[-1]
    growth_s = last[1]["shards"]["peak"] / max(first[1]["shards"]["peak"], 1)
    growth_w = last[1]["whole"]["peak"] / max(first[1]["whole"]["peak"], 1)
    per_image = [r[1]["shards"]["seconds"] / r[0] for r in rows]
    lines.append(
        f"\nFrom {first[0]} to {last[0]} images ({last[0] // first[0]}x): peak memory x{growth_s:.2f} with shards, "
        f"x{growth_w:.2f} without; time per image with shards {min(per_image) * 1e3:.2f}-{max(per_image) * 1e3:.2f} ms "
        f"(linear: no cliff). Total {time.perf_counter() - t_start:.0f} s.")
    write_section(args.out, "<!-- scale:begin -->", "<!-- scale:end -->", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
