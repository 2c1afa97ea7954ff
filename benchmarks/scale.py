"""Start-up at scale on CPU: two gloo ranks build a ~1B-parameter Gaze VLM and shard it with FSDP2.

    python benchmarks/scale.py --json benchmarks/results/scale-cpu.json [--quick]

The parent process builds the LLM and the vision tower from configs (random init, fp32, as the recipes
keep master weights) and writes them with `save_pretrained` to a temporary folder. Each rank then starts
the way `gazelit fit` does under fsdp2: `GazeVLM.build(..., empty_pretrained=True)` (pretrained parts on
the meta device), the project's FSDP2 plan (every decoder layer and vision block its own unit, then the
root), and `load_pretrained_shards` (each rank reads only its rows of every safetensors tensor). It reports
its peak resident memory and start-up time (build + shard + read). Target (issue 12): every rank's peak
RSS <= 0.6 x the full fp32 model + 1.5 GiB; a full fp32 copy per rank cannot meet it. Rank 0 then runs compiled FlexAttention's
forward over batches of many lengths padded to buckets and counts compilations (dynamo's counter).

`--quick` uses a ~0.16B model and fewer batches (under a minute here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GiB = 2**30


def llm_config(quick: bool) -> dict:
    from gazelit.models.tiny import TINY_LLM

    size = dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816) if quick else \
        dict(hidden_size=2048, num_hidden_layers=18, intermediate_size=5632)  # fmt: skip
    return {**TINY_LLM["qwen3"], **size, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": size["hidden_size"] // 16, "vocab_size": 32_000}  # fmt: skip


VISION = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, image_size=64,
              patch_size=8)  # fmt: skip


def write_pretrained(folder: Path, quick: bool) -> None:
    """The LLM and the vision tower as local transformers directories (random weights, fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gazelit.models.vision import vision_family

    torch.manual_seed(0)
    fields = llm_config(quick)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    llm.save_pretrained(folder / "llm")
    del llm
    family = vision_family("siglip2")
    family.model_class(config := family.config_from_mapping(VISION))(config).save_pretrained(folder / "vision")


def rank_main(rank: int, world: int, port: int, quick: bool, out: str, pretrained: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    start = time.perf_counter()
    from torch.distributed.device_mesh import init_device_mesh

    from gazelit.models.gaze_vlm import GazeVLM
    from gazelit.schema import GazeSpec, LLMSpec, ModelConfig, VisionSpec
    from gazelit.tokenizer import build_tiny_tokenizer
    from gazelit.training.parallel import ParallelPlan, apply_parallelism

    folder = Path(pretrained)
    config = ModelConfig(vision=VisionSpec("siglip2", pretrained=str(folder / "vision")),
                         llm=LLMSpec(pretrained=str(folder / "llm"), dtype="float32"),
                         gaze=GazeSpec(top_k=4, region=[2, 2], num_context=2))  # fmt: skip
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(["scale check"] * 4, vocab_size=512)
    model = GazeVLM.build(config, tokenizer=tokenizer, empty_pretrained=True)
    assert set(model.pending_weights) == {"llm", "vision.model"}, model.pending_weights
    params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,))
    apply_parallelism(model, ParallelPlan(), mesh)
    model.load_pretrained_shards("cpu")
    startup = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": rank, "params": params, "startup_s": startup, "peak_rss_bytes": peak}
    if rank == 0:
        result.update(flex_compilations(quick))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def flex_compilations(quick: bool) -> dict:
    import warnings

    from gazelit.attention import GazeLayout, RegionShape, Unit
    from gazelit.attention.flex import compilations, flex_gaze_attention
    from gazelit.datamodules.collate import bucket_length

    buckets, rng = [128, 192, 256], random.Random(0)
    count = 12 if quick else 24
    start, lengths, padded = compilations(), set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(count):
            units, pos = [], rng.randint(1, 6)
            for _ in range(rng.randint(1, 3)):
                units.append(Unit(pos, (4, 4)))
                pos += 16 + 2 + rng.randint(0, 8)
            n = pos + rng.randint(1, 80)
            length = bucket_length(n, buckets)
            lengths.add(n)
            padded.add(length)
            layout = GazeLayout.build([units], length, 2, RegionShape(2, 2), valid=[(0, n)])
            q, k, v = (torch.randn(1, h, length, 16) for h in (4, 2, 2))
            flex_gaze_attention(q, k, v, layout, 2, compiled=True)
    return {"flex_recompiles": compilations() - start, "flex_batches": count, "distinct_lengths": len(lengths),
            "buckets_used": len(padded)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.json).parent / ".scale-ranks"
    out.mkdir(parents=True, exist_ok=True)
    world = 2
    with tempfile.TemporaryDirectory() as pretrained:
        # in its own process: a child inherits its parent's peak RSS, which would then be counted in the ranks'
        writer = mp.get_context("spawn").Process(target=write_pretrained, args=(Path(pretrained), args.quick))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing the pretrained directories failed (exit code {writer.exitcode})")
        mp.spawn(rank_main, args=(world, 29_000 + os.getpid() % 1000, args.quick, str(out), pretrained),
                 nprocs=world, join=True)  # fmt: skip
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    params = ranks[0]["params"]
    full = params * 4
    target = 0.6 * full + 1.5 * GiB
    result = {
        "params": params, "full_fp32_bytes": full, "ranks": world,
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks], "startup_s": max(r["startup_s"] for r in ranks),
        "target_bytes_per_rank": target, "meets_target": all(r["peak_rss_bytes"] <= target for r in ranks),
        "flex_recompiles": ranks[0]["flex_recompiles"], "flex_batches": ranks[0]["flex_batches"],
        "distinct_lengths": ranks[0]["distinct_lengths"], "buckets_used": ranks[0]["buckets_used"],
        "init": "pretrained parts built on the meta device, sharded, then each rank reads its rows of the "
                "safetensors files (GazeVLM.build(empty_pretrained=True) + load_pretrained_shards)",
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("| params | full fp32 | peak RSS per rank | target per rank | meets | start-up | flex compiles / batches / lengths |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {params / 1e9:.2f} B | {full / GiB:.1f} GiB | "
          f"{', '.join(f'{b / GiB:.1f}' for b in result['peak_rss_bytes_per_rank'])} GiB | {target / GiB:.1f} GiB | "
          f"{result['meets_target']} | {result['startup_s']:.0f} s | {result['flex_recompiles']} / "
          f"{result['flex_batches']} / {result['distinct_lengths']} |")  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
