"""Scale in images: time and peak memory of loading a folder and of the engine against N.

    python benchmarks/scale.py            # 1k, 4k, 16k images, ViT-S/16 at 224 px (about 15 minutes)
    python benchmarks/scale.py --quick    # 256 .. 1024 images (about 3 minutes)

**Loading.** A folder of N JPEG images (256 px, 10 class subfolders) is loaded for a ViT-S/16
(``ordersearch.data.load`` with timm's eval transform: resize, centre crop to 224 px,
normalise), each N in a fresh process, two ways: **stream** (decoded a chunk at a time into
memory-mapped ``.npy`` files in the cache folder, what ``load`` does above 2 GiB) and
**memory** (decoded into tensors, as below 2 GiB; not run where it would not fit this machine).

**Engine.** A ViT-S/16-sized bank (timm ``vit_small_patch16_224``, random weights, 4 blocks:
197 x 384 activations, ~0.3 MB per image per cached prefix; the images ~0.6 MB each) scores
the same 3 orders (5 distinct prefixes) on N images, each N in a fresh process, two ways:

- **shards**: the images memory-mapped from a ``.npy`` file (``EvalSet.from_npy``) and the
  engine's automatic shards under a 256 MiB cache budget;
- **whole**: the images in memory and no shards (``shard_images=0``); not run where it would
  not fit this machine.

Peak memory is the process's anonymous resident memory (``RssAnon``, sampled every 10 ms;
a memory-mapped file's pages are the page cache's, not the process's) above what it held
before the work began. Writes its section of ``benchmarks/RESULTS.md``.
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
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import proc_status, write_section  # noqa: E402

BANK = ("timm:vit_small_patch16_224", dict(depth=4, num_classes=10))
MEMORY_LIMIT = 0.6  # of this machine's memory: a "memory"/"whole" run expected to take more is not run
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


class PeakMemory:
    """The most anonymous resident memory (RssAnon) above its value at entry, sampled every
    10 ms in a thread while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = proc_status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status("RssAnon"))
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.bytes = self.peak - self.base


def write_folder(root: Path, n: int) -> None:
    """``n`` 256 px JPEG images in 10 class subfolders (smooth random colours, so that they
    compress as photographs do)."""
    import numpy as np
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        low = torch.rand(1, 3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(low, size=(256, 256), mode="bicubic").clamp(0, 1)[0]
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def one_load(root: Path, mode: str) -> dict:
    """Load the folder ``root`` for the bank (run in a fresh process)."""
    import os

    from ordersearch import load_bank
    from ordersearch.data import load

    os.environ["ORDERSEARCH_CACHE"] = str(root.parent / "cache")
    bank = load_bank(BANK[0], **BANK[1])
    with PeakMemory() as m:
        data = load(root, bank.data_config, stream=mode == "stream")
    return {"n": sum(data.sizes().values()), "mode": mode, "seconds": m.seconds, "peak": m.bytes,
            "streamed": bool(data.description.get("streamed"))}


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
    with PeakMemory() as m:
        if mode == "shards":
            es = EvalSet.from_npy(path, y)
            engine = Engine(bank, es, "probe", cache_bytes=BUDGET, batch_size=BATCH, device="cpu")
        else:
            es = EvalSet(torch.from_numpy(np.load(path)), y)
            engine = Engine(bank, es, "probe", cache_bytes=BUDGET, batch_size=BATCH, device="cpu", shard_images=0)
        scores = engine.evaluate(ORDERS)
    level = engine._levels[n]
    return {"n": n, "mode": mode, "seconds": m.seconds, "peak": m.bytes,
            "live": engine.stats.live_bytes_peak, "shards": len(level.shards or [level]),
            "block_seconds": engine.stats.block_seconds, "ok": all(s.ok for s in scores),
            "values": [s.value for s in scores]}


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _run(kind: str, path: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--one", kind, str(path), mode], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{kind} {mode} on {path.name} failed: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--one", nargs=3, metavar=("KIND", "PATH", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        kind, path, mode = args.one
        print(json.dumps((one_load if kind == "load" else one)(Path(path), mode)))
        return
    sizes = [256, 512, 1024] if args.quick else [1024, 4096, 16384]
    memory = _machine_memory()
    t_start = time.perf_counter()
    loads, rows = [], []
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:  # on disk: /tmp may be memory
        for n in sizes:
            root = Path(tmp) / f"folder{n}"
            write_folder(root, n)
            runs = {}
            # decoded tensors, their shifted copy and the splits: about 3x the images at once
            for mode in ("stream", "memory"):
                if mode == "memory" and 3 * n * 3 * 224 * 224 * 4 > MEMORY_LIMIT * memory:
                    continue
                runs[mode] = r = _run("load", root, mode)
                print(f"load {n:6d} {mode:6s} {r['seconds']:6.1f} s  peak {r['peak'] / 2**20:7.0f} MiB", flush=True)
                subprocess.run(["rm", "-rf", str(Path(tmp) / "cache")], check=True)
            loads.append((n, runs))
            subprocess.run(["rm", "-rf", str(root)], check=True)

            path = Path(tmp) / f"x{n}.npy"
            write_images(path, n)
            runs = {}
            for mode in ("shards", "whole"):
                # the images and one whole-set activation per distinct prefix and the stem
                if mode == "whole" and n * 3 * 224 * 224 * 4 * (1 + 6 * 0.5) > MEMORY_LIMIT * memory:
                    continue
                runs[mode] = r = _run("engine", path, mode)
                print(f"engine {n:6d} {mode:6s} {r['seconds']:6.1f} s  peak {r['peak'] / 2**20:7.0f} MiB  "
                      f"live {r['live'] / 2**20:6.0f} MiB  shards {r['shards']}", flush=True)
            same = runs["shards"]["values"] == runs["whole"]["values"] if "whole" in runs else None
            rows.append((n, runs, same))
            path.unlink()

    def cells(runs: dict, modes: tuple[str, str], n: int) -> str:
        """Time, time per image and peak of both modes, as table cells."""
        def both(fmt: Callable[[dict], str]) -> str:
            return " / ".join(fmt(runs[m]) if m in runs else "not run" for m in modes)

        return " | ".join([both(lambda r: f"{r['seconds']:.1f} s"), both(lambda r: f"{1e3 * r['seconds'] / n:.2f}"),
                           both(lambda r: f"{r['peak'] / 2**20:.0f} MiB")])

    lines = [
        "## Scale in images\n",
        f"Command: `python benchmarks/scale.py{' --quick' if args.quick else ''}` · "
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} · {platform.platform()} · {os.cpu_count()} CPUs, "
        f"{memory / 2**30:.0f} GiB. Each run in a fresh process; peak = anonymous resident memory (RssAnon) above "
        "the process's before the work (a memory-mapped file's pages are the page cache's). *not run*: expected "
        f"to take over {MEMORY_LIMIT:.0%} of this machine's memory.\n",
        f"**Loading a folder** of N 256 px JPEGs for {BANK[0]} (resize, centre crop to 224 px, normalise: 0.6 MB "
        "per image as float32). *stream*: `load(..., stream=True)`, decoded 64 images at a time into "
        "memory-mapped .npy files (what `load` does above 2 GiB); *memory*: `stream=False`.\n",
        "| images | time stream / memory | ms per image stream / memory | peak stream / memory |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {cells(runs, ('stream', 'memory'), n)} |" for n, runs in loads]
    lines += [
        f"\n**Engine.** Bank {BANK[0]} with {BANK[1]['depth']} blocks (random weights; 197 x 384 activations), "
        f"probe objective, orders {', '.join(ORDERS)} (5 distinct prefixes), cache budget {BUDGET // 2**20} MiB, "
        f"batch {BATCH}. *shards*: images memory-mapped from a .npy file (`EvalSet.from_npy`) and the engine's "
        "automatic shards; *whole*: images in memory, no shards (`shard_images=0`). Engine live = its activation "
        "buffers (cache + path + stem outputs).\n",
        "| images | shards | time shards / whole | ms per image shards / whole | peak shards / whole | "
        "engine live shards / whole | scores identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, runs, same in rows:
        live = " / ".join(f"{runs[m]['live'] / 2**20:.0f} MiB" if m in runs else "not run" for m in ("shards", "whole"))
        lines.append(f"| {n} | {runs['shards']['shards']} | {cells(runs, ('shards', 'whole'), n)} | {live} | "
                     f"{'-' if same is None else 'yes' if same else 'NO'} |")
    (n0, l0), (n1, l1) = loads[0], loads[-1]
    (_, e0, _), (_, e1, _) = rows[0], rows[-1]
    per_load = [runs["stream"]["seconds"] / n for n, runs in loads]
    per_engine = [runs["shards"]["seconds"] / n for n, runs, _ in rows]
    lines.append(
        f"\nFrom {n0} to {n1} images ({n1 // n0}x): peak memory x{l1['stream']['peak'] / max(l0['stream']['peak'], 1):.2f} "
        f"when streaming the folder, x{e1['shards']['peak'] / max(e0['shards']['peak'], 1):.2f} for the engine with "
        f"shards; time per image {min(per_load) * 1e3:.2f}-{max(per_load) * 1e3:.2f} ms loading, "
        f"{min(per_engine) * 1e3:.2f}-{max(per_engine) * 1e3:.2f} ms scoring. Total {time.perf_counter() - t_start:.0f} s.")
    write_section(args.out, "<!-- scale:begin -->", "<!-- scale:end -->", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
