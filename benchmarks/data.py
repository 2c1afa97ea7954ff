"""Data loading benchmark: the shard stream (GazeDataModule's train loader) against a folder-of-files loader.

Both loaders read the same generated demo samples and run the same per-sample code (SampleProcessor:
tokenisation, decoding, the image transform) and the same collation; they differ in how samples reach the
workers: sequential reads from tar shards with a shuffle buffer, versus one file read per sample in
random order (a map-style Dataset over the JSONL with torch's DataLoader). Reported per DataLoader worker:
images/s on an image-only set and clips/s on an mp4 set, each with the files in the OS page cache (warm)
and evicted from it first (cold, via posix_fadvise on our own files only), best of --repeats runs; plus
peak memory of the whole process tree (PSS, so forked workers' shared pages count once) while streaming
a few thousand samples, and its level early vs late in the run (flat = no growth).

    python benchmarks/data.py [--json PATH] [--quick] [--workers N] [--repeats N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gazelit.schema import DataConfig, SourceConfig
from gazelit.datamodules.convert import prepare_record
from gazelit.datamodules.datamodule import GazeDataModule
from gazelit.datamodules.demo_data import generate_demo_data
from gazelit.datamodules.loader import init_worker
from gazelit.datamodules.records import media_ref
from gazelit.datamodules.samples import SampleProcessor
from gazelit.datamodules.transforms import ResizeNormalize
from gazelit.tokenizer import build_tiny_tokenizer

IMAGE_SIZE = 96
VISUAL_GRID = (12, 12)
NUM_CONTEXT = 4


class FolderDataset(Dataset):
    """The plain baseline: JSONL records + media files read from disk one sample at a time.

    Records get the same `media_info` the converter stores (probed once here, outside the timing), so
    the per-sample work matches the stream's exactly; only the way bytes arrive differs."""

    def __init__(self, jsonl: Path, media_root: Path, processor: SampleProcessor):
        self.processor = processor
        self.items: list[tuple[bytes, Path, str]] = []
        for line_no, line in enumerate(jsonl.read_bytes().splitlines(), start=1):
            prepared = prepare_record((line_no, line), media_root.resolve())
            record_json = prepared.members["json"]
            ref = media_ref(json.loads(record_json))
            member = next(k for k in prepared.members if k != "json")
            self.items.append((record_json, media_root / ref.path, member))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        record_json, path, member = self.items[index]
        raw = {"__key__": str(index), "__url__": str(path), "json": record_json, member: path.read_bytes()}
        return self.processor(raw, "folder")


class MemorySampler:
    """Samples the memory of this process and its children every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (time, main RSS MiB, tree PSS MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            pids = [me, *_children(me)]
            self.samples.append(
                (time.perf_counter() - self._start, _kib(me, "status", "VmRSS") / 1024,
                 sum(_kib(p, "smaps_rollup", "Pss") for p in pids) / 1024)
            )  # fmt: skip
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        tree = [s[2] for s in self.samples]
        fifth = max(1, len(tree) // 5)
        return {
            "peak_main_rss_mib": round(max(s[1] for s in self.samples), 1),
            "peak_tree_pss_mib": round(max(tree), 1),
            "tree_pss_early_mib": round(sum(tree[fifth : 2 * fifth]) / max(1, len(tree[fifth : 2 * fifth])), 1),
            "tree_pss_late_mib": round(sum(tree[-fifth:]) / fifth, 1),
        }


def _children(pid: int) -> list[int]:
    try:
        out = []
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        return out
    except OSError:
        return []


def _kib(pid: int, file: str, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop these files' pages from the OS page cache (only ours: no root needed, nothing else affected)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(paths: list[Path]) -> None:
    for path in paths:
        path.read_bytes()


def time_loader(batches, units: str, workers: int) -> dict[str, float]:
    """Iterate; count samples; the wait for the first batch (worker start-up) is reported too."""
    start = time.perf_counter()
    first = None
    samples = 0
    for batch in batches:
        samples += batch["input_ids"].shape[0]
        if first is None:
            first = time.perf_counter()
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": round(seconds, 3),
        "first_batch_s": round((first or start) - start, 3),
        f"{units}_per_s": round(samples / seconds, 1),
        f"{units}_per_s_per_worker": round(samples / seconds / max(1, workers), 1),
    }


def measure(kind: str, data, tokenizer, transform, workers: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Stream and folder loader over the same samples, with a warm and with a cold page cache; each
    measurement is repeated (alternating the loaders) and the fastest run kept, as the machine is shared."""
    units = "images" if kind == "image" else "clips"
    config = DataConfig(
        sources=[SourceConfig(str(data.shards["train"]))], batch_size=batch_size, num_workers=workers,
        max_length=4096, max_frames=8, shuffle_buffer=500, seed=0,
    )  # fmt: skip
    dm = GazeDataModule(config, tokenizer, transform, VISUAL_GRID, NUM_CONTEXT)
    stream_loader = dm.train_dataloader()  # one epoch = one pass over the shards
    folder_loader = DataLoader(
        FolderDataset(data.jsonl["train"], data.media_root, dm.processor), batch_size=batch_size, shuffle=True,
        num_workers=workers, collate_fn=dm.collator(), worker_init_fn=init_worker if workers else None,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    shard_files = sorted(Path(data.shards["train"]).glob("*.tar"))
    media_files = sorted(p for p in Path(data.media_root).rglob("*") if p.is_file())
    runs: dict[str, list[dict[str, float]]] = {}
    with MemorySampler() as memory:
        for _ in range(repeats):
            for cache in ("warm", "cold"):
                contenders = (("stream", stream_loader, shard_files), ("folder", folder_loader, media_files))
                for name, loader, files in contenders:
                    (evict_from_page_cache if cache == "cold" else read_into_page_cache)(files)
                    runs.setdefault(f"{name}_{cache}", []).append(time_loader(iter(loader), units, workers))
    results: dict[str, Any] = {}
    for key, attempts in runs.items():
        best = min(attempts, key=lambda r: r["seconds"])
        results[key] = {**best, "all_seconds": [r["seconds"] for r in attempts]}
    results["memory_during_run"] = memory.summary()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="small run (CI smoke test)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="runs per measurement, fastest kept (default 3, quick 1)")
    parser.add_argument("--keep", type=Path, help="generate the data here and keep it")
    args = parser.parse_args(argv)

    images, clips = (480, 96) if args.quick else (3000, 400)
    repeats = args.repeats or (1 if args.quick else 3)
    root = args.keep or Path(tempfile.mkdtemp(prefix="gazelit-bench-"))
    started = time.perf_counter()
    image_data = generate_demo_data(root / "images", train=images, val=0, test=0, video_fraction=0.0,
                                    image_size=IMAGE_SIZE, shard_size=250)  # fmt: skip
    video_data = generate_demo_data(root / "videos", train=clips, val=0, test=0, video_fraction=1.0,
                                    image_size=IMAGE_SIZE, video_frames=8, shard_size=50)  # fmt: skip
    generation_s = time.perf_counter() - started
    tokenizer = build_tiny_tokenizer(image_data.corpus + video_data.corpus, vocab_size=600)
    transform = ResizeNormalize(IMAGE_SIZE)

    results = {
        "image": measure("image", image_data, tokenizer, transform, args.workers, args.batch_size, repeats),
        "video": measure("video", video_data, tokenizer, transform, args.workers, args.batch_size, repeats),
    }
    report = {
        "settings": {"workers": args.workers, "batch_size": args.batch_size, "images": images, "clips": clips,
                     "repeats": repeats,
                     "image_size": IMAGE_SIZE, "frames_per_clip": 8, "quick": args.quick},
        "machine": {"cpus": os.cpu_count(), "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__},
        "data_generation_s": round(generation_s, 1),
        "results": results,
    }  # fmt: skip
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"workers={s['workers']} batch={s['batch_size']} images {s['image_size']}px, "
          f"{s['frames_per_clip']} frames/clip; load average after: {report['machine']['load_avg_after']}")
    print(f"best of {s['repeats']} runs each")
    print(f"{'set':<7}{'loader':<8}{'cache':<7}{'samples':>8}{'seconds':>9}{'per s':>8}{'per s/worker':>14}")
    for kind, units in (("image", "images"), ("video", "clips")):
        for cache in ("warm", "cold"):
            for name in ("stream", "folder"):
                r = report["results"][kind][f"{name}_{cache}"]
                print(f"{kind:<7}{name:<8}{cache:<7}{r['samples']:>8}{r['seconds']:>9.2f}{r[f'{units}_per_s']:>8.0f}"
                      f"{r[f'{units}_per_s_per_worker']:>14.0f}")
    for kind in ("image", "video"):
        m = report["results"][kind]["memory_during_run"]
        print(f"{kind}: peak main RSS {m['peak_main_rss_mib']} MiB, peak PSS of process tree {m['peak_tree_pss_mib']} "
              f"MiB (second fifth of the run {m['tree_pss_early_mib']} -> last fifth {m['tree_pss_late_mib']} MiB)")


if __name__ == "__main__":
    sys.exit(main())
