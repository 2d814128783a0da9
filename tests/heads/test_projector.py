"""Token compression (average pooling / stacking) and per-rate projectors."""

from __future__ import annotations

import pytest
import torch

from heads.projector import MultiRateProjector, compress_tokens


def frames(time: int = 7, dim: int = 2) -> torch.Tensor:
    return torch.arange(2 * time * dim, dtype=torch.float32).view(2, time, dim)


def test_average_pooling_by_hand():
    x = frames()
    out, lengths = compress_tokens(x, torch.tensor([7, 5]), rate=3, mode="avg")
    assert out.shape == (2, 3, 2) and lengths.tolist() == [3, 2]
    torch.testing.assert_close(out[0, 0], x[0, 0:3].mean(0))
    torch.testing.assert_close(out[0, 2], x[0, 6])  # last group holds one frame: its mean is that frame
    torch.testing.assert_close(out[1, 1], x[1, 3:5].mean(0))  # frames past length 5 do not count
    assert out[1, 2].abs().sum() == 0  # a group with no valid frame is zero


def test_stacking_by_hand():
    x = frames()
    out, lengths = compress_tokens(x, torch.tensor([7, 4]), rate=2, mode="stack")
    assert out.shape == (2, 4, 4) and lengths.tolist() == [4, 2]
    torch.testing.assert_close(out[0, 1], torch.cat([x[0, 2], x[0, 3]]))
    torch.testing.assert_close(out[0, 3], torch.cat([x[0, 6], torch.zeros(2)]))
    assert out[1, 2:].abs().sum() == 0


def test_rate_one_is_identity():
    x = frames()
    for mode in ("avg", "stack"):
        out, lengths = compress_tokens(x, torch.tensor([7, 7]), rate=1, mode=mode)
        torch.testing.assert_close(out, x)


def test_per_rate_and_shared_projectors():
    torch.manual_seed(0)
    proj = MultiRateProjector(2, 8, [2, 4], hidden=16, mode="stack")
    assert set(proj.projectors) == {"2", "4"}
    assert proj.projectors["4"][0].in_features == 8 and proj.projectors["2"][0].in_features == 4
    tokens, lengths = proj(frames(), torch.tensor([7, 7]), 4)
    assert tokens.shape == (2, 2, 8) and lengths.tolist() == [2, 2]
    shared = MultiRateProjector(2, 8, [2, 4], hidden=16, mode="avg", shared=True)
    assert list(shared.projectors) == ["shared"]
    with pytest.raises(KeyError, match="rate 3 is not one of this projector's rates"):
        proj(frames(), torch.tensor([7, 7]), 3)
    with pytest.raises(ValueError, match="shared projector needs mode 'avg'"):
        MultiRateProjector(2, 8, [2], hidden=4, mode="stack", shared=True)
    with pytest.raises(ValueError, match="distinct positive"):
        MultiRateProjector(2, 8, [2, 2], hidden=4)
