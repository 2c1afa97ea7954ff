"""Compiled FlexAttention (forward; CPU has no compiled backward) over many batch lengths: bucketed padding
and dynamic routing-table dims give one compilation per bucket, never the recompile limit, and the results
equal the reference."""

from __future__ import annotations

import random
import warnings


from gazelit.attention import PAD, GazeLayout, RegionShape, Unit, reference_attention
from gazelit.attention.flex import compilations, flex_gaze_attention
from gazelit.datamodules.collate import bucket_length

BUCKETS = [128, 192]


def batches(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        samples, lengths = [], []
        for _ in range(2):
            units, pos = [], rng.randint(1, 5)
            for _ in range(rng.randint(1, 3)):
                grid = rng.choice([(3, 5), (4, 4), (5, 6)])
                units.append(Unit(pos, grid))
                pos += grid[0] * grid[1] + 2 + rng.randint(0, 6)
            samples.append(units)
            lengths.append(pos + rng.randint(1, 60))
        padded = bucket_length(max(lengths), BUCKETS)
        yield max(lengths), GazeLayout.build(samples, padded, 2, RegionShape(2, 2), valid=[(0, n) for n in lengths])


def test_compiled_flex_compiles_once_per_bucket_and_equals_the_reference():
    import torch._dynamo

    torch._dynamo.reset()
    start = compilations()
    seen_lengths, seen_buckets = set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (length, layout) in enumerate(batches(22)):
            seen_lengths.add(length)
            seen_buckets.add(layout.length)
            g = torch.Generator().manual_seed(i)
            q, k, v = (torch.randn(2, h, layout.length, 16, generator=g) for h in (4, 2, 2))
            top_k = [1, 2, None][i % 3]
            out = flex_gaze_attention(q, k, v, layout, top_k, compiled=True)
            ref = reference_attention(q, k, v, layout, top_k)
            real = (layout.kind != PAD)[:, None, :, None]
            assert ((out - ref) * real).abs().max() < 1e-5, i
    assert len(seen_lengths) >= 10 and seen_buckets == set(BUCKETS)
    assert compilations() - start <= len(BUCKETS)
    assert torch._dynamo.config.fail_on_recompile_limit_hit  # past the limit: an error, never eager
