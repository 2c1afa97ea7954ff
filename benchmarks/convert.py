"""`gazelit convert` at Cambrian scale: records/s with 1 and 2 workers, peak memory, and where the time goes.

    python benchmarks/convert.py --json benchmarks/results/convert-cpu.json [--records 50000]

Generates `--records` image records (64x64 PNG boards, a two-turn conversation each) as JSONL + media,
converts them with 1 and 2 workers (each run in its own process: wall time and peak RSS over the process
and its pool), checks memory stays flat (peak RSS at a fifth of the records against the full run), and
profiles a single-worker run of 2,000 records to split the time into reading + validating media, tar
writing, and hashing. Prints a table and the hours 7 million records (Cambrian-7M) would take.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMBRIAN_7M = 7_000_000


def generate(root: Path, records: int) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    media = root / "media"
    rng = random.Random(0)
    lines = []
    for i in range(records):
        folder = media / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        x, y = rng.randint(0, 40), rng.randint(0, 40)
        ImageDraw.Draw(image).rectangle([x, y, x + 20, y + 20], fill=(rng.randint(0, 255), 60, 60))
        image.save(folder / f"{i:07d}.png")
        lines.append(json.dumps({"id": f"r{i}", "image": f"{i // 1000:04d}/{i:07d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "It is red, near the top left."}]}))  # fmt: skip
    jsonl = root / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, media


RUN = """
import resource, sys, time
from gazelit.datamodules.convert import convert
start = time.perf_counter()
manifest = convert(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=1000, workers=int(sys.argv[4]),
                   overwrite=True, progress=False)
elapsed = time.perf_counter() - start
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pool = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(elapsed, manifest.num_samples, own * 1024, pool * 1024)
"""


def timed_run(jsonl: Path, media: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, str(jsonl), str(media), str(out), str(workers)],
                          capture_output=True, text=True, check=True, cwd=REPO)  # fmt: skip
    elapsed, samples, own, pool = proc.stdout.split()
    return {"workers": workers, "records": int(samples), "seconds": float(elapsed),
            "records_per_s": int(samples) / float(elapsed), "peak_rss_bytes": int(own),
            "peak_rss_worker_bytes": int(pool),
            "hours_for_7m": CAMBRIAN_7M / (int(samples) / float(elapsed)) / 3600}  # fmt: skip


def profile(jsonl: Path, media: Path, out: Path, records: int = 2000) -> dict:
    from gazelit.datamodules.convert import convert

    head = out.parent / "head.jsonl"
    with jsonl.open() as f, head.open("w") as g:
        for _, line in zip(range(records), f):
            g.write(line)
    import webdataset  # noqa: F401  (imported up front: its import, which loads torch, is not conversion time)

    profiler = cProfile.Profile()
    profiler.enable()
    convert(head, media, out, shard_size=1000, workers=1, overwrite=True, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler).stats

    def cumulative(file_part: str, func: str) -> float:
        return sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items() if name == func and file_part in file)

    total = cumulative("datamodules/convert.py", "convert")
    parts = {
        "media path checks (resolve_media_path)": cumulative("datamodules/paths.py", "resolve_media_path"),
        "media validation (decode headers, sizes)": cumulative("datamodules/convert.py", "_load_media")
        - cumulative("datamodules/paths.py", "resolve_media_path"),
        "json + record checks": cumulative("datamodules/convert.py", "prepare_record")
        - cumulative("datamodules/convert.py", "_load_media"),
        "tar writing (webdataset TarWriter)": cumulative("webdataset/writer.py", "write"),
        "shard close: fsync + sha256": cumulative("datamodules/convert.py", "_finish_shard"),
    }
    parts["other (progress, manifest)"] = total - sum(parts.values())
    return {"records": records, "total_s": total, "seconds": parts, "shares": {k: v / total for k, v in parts.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        jsonl, media = generate(root, args.records)
        generated = time.perf_counter() - start
        runs = [timed_run(jsonl, media, root / f"out{w}", w) for w in (1, 2)]
        small = root / "small.jsonl"
        small.write_text("".join(jsonl.read_text().splitlines(keepends=True)[: args.records // 5]))
        flat = timed_run(small, media, root / "out-small", 1)
        prof = profile(jsonl, media, root / "out-prof")
    result = {"records": args.records, "generate_s": generated, "runs": runs, "fifth_of_records": flat,
              "profile": prof, "machine": f"{sys.platform}, {__import__('os').cpu_count()} cores",
              "resource_units": "bytes"}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("| workers | records | records/s | peak RSS (MiB) | peak RSS of a pool worker (MiB) | hours for 7M |")
    print("|---|---|---|---|---|---|")
    for r in runs + [flat]:
        print(f"| {r['workers']} | {r['records']} | {r['records_per_s']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
              f"{r['peak_rss_worker_bytes'] / 2**20:.0f} | {r['hours_for_7m']:.1f} |")
    print("time shares (single worker, 2,000 records):", {k: f"{v:.0%}" for k, v in prof["shares"].items()})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
