"""Layout: token roles, region tiling (edge tiles, no dropped tokens), spatio-temporal regions, checks."""

import pytest
import torch

from gazelit.attention import CONTEXT, PAD, TEXT, VISUAL, GazeLayout, RegionShape, Unit


def test_roles_and_edge_tiles_cover_every_visual_token():
    layout = GazeLayout.build([[Unit(2, (5, 7))]], length=42, num_context=3, region=RegionShape(2, 3))
    kind = layout.kind[0]
    assert kind[:2].tolist() == [TEXT, TEXT]
    assert (kind[2:37] == VISUAL).all() and (kind[37:40] == CONTEXT).all() and (kind[40:] == TEXT).all()
    # a 5x7 grid in 2x3 tiles: ceil(5/2) * ceil(7/3) = 3 * 3 regions, edge tiles smaller
    assert layout.num_regions == 9
    regions = layout.region[0, 2:37].view(5, 7)
    assert regions[0].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert regions[:, 0].tolist() == [0, 0, 3, 3, 6]
    sizes = (layout.region_tokens[0] >= 0).sum(-1).tolist()
    assert sizes == [6, 6, 2, 6, 6, 2, 3, 3, 1] and sum(sizes) == 35
    # region_tokens lists exactly the positions that carry the region id
    for r in range(9):
        toks = layout.region_tokens[0, r]
        assert sorted(toks[toks >= 0].tolist()) == (layout.region[0] == r).nonzero().flatten().tolist()
    # visible from the first position after the unit's context tokens
    assert layout.region_ready[0].tolist() == [40] * 9


def test_video_frames_grouped_in_time_into_spatio_temporal_regions():
    frames = [Unit(0 + 6 * t, (2, 2), video=7, time=t) for t in range(3)]
    layout = GazeLayout.build([frames], length=20, num_context=2, region=RegionShape(2, 2, 2))
    # frames 0-1 share region 0, frame 2 has region 1 alone
    assert layout.region[0, 0:4].tolist() == [0] * 4 and layout.region[0, 6:10].tolist() == [0] * 4
    assert layout.region[0, 12:16].tolist() == [1] * 4
    assert layout.region_ready[0].tolist() == [12, 18]  # after frame 1 and frame 2 (with context)
    assert ((layout.region_tokens[0, 0] >= 0).sum().item(), (layout.region_tokens[0, 1] >= 0).sum().item()) == (8, 4)


def test_padding_and_positions_past_the_layout():
    layout = GazeLayout.build([[Unit(3, (2, 2))], []], length=10, num_context=1, valid=[(1, 10), (0, 6)])
    assert layout.kind[0, 0] == PAD and layout.kind[1, 6:].eq(PAD).all()
    assert layout.kinds_at(torch.tensor([9, 10, 25])).tolist() == [[TEXT, TEXT, TEXT], [PAD, TEXT, TEXT]]


def test_from_token_kinds_round_trip_and_mismatch_errors():
    layout = GazeLayout.build([[Unit(1, (2, 3))], [Unit(0, (2, 3)), Unit(8, (2, 3))]], length=16, num_context=2)
    kinds = layout.kind.clone()
    args = dict(
        unit_sample=torch.tensor([0, 1, 1]),
        unit_start=torch.tensor([1, 0, 8]),
        unit_grid=torch.tensor([[2, 3], [2, 3], [2, 3]]),
        num_context=2,
    )
    again = GazeLayout.from_token_kinds(kinds, **args)
    assert torch.equal(again.region, layout.region)
    with pytest.raises(ValueError, match=r"sample 0 position 7: token_kind says context .* implies visual"):
        GazeLayout.from_token_kinds(kinds, **{**args, "unit_grid": torch.tensor([[2, 4], [2, 3], [2, 3]])})
    with pytest.raises(ValueError, match="overlap"):
        GazeLayout.build([[Unit(0, (2, 3)), Unit(5, (2, 3))]], length=20, num_context=2)
    bad = kinds.clone()
    bad[1, 12] = PAD
    with pytest.raises(ValueError, match="padding inside"):
        GazeLayout.from_token_kinds(bad, **args)
