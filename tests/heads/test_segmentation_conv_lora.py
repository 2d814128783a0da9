"""LoRA on the segmentation decoder's convolutions: trains through the masked loss, merges exactly."""

from __future__ import annotations

import pytest
import torch

import mm
from heads.segmentation import IGNORE, SegmentationHead, segmentation_loss


def test_segmentation_decoder_convs_take_lora_and_merge_exactly():
    torch.manual_seed(0)
    head = SegmentationHead([8, 16], num_classes=3, width=16).eval()
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    target = torch.randint(0, 3, (2, 16, 16))
    target[:, :2] = IGNORE
    base = head(features, (16, 16)).detach()
    # The 16 -> 3 classifier (48 weights) is smaller than any rank-4 adapter (76 parameters): refused by name.
    with pytest.raises(mm.ConfigError, match=r"layer 'classifier', a Conv2d\(16->3, kernel \(1, 1\)\), would have "
                       r"76 parameters, more than the layer's 48; use r <= 2"):
        mm.attach(head, mm.LoRAConfig(targets=["all-conv"], r=4))
    mm.attach(head, mm.LoRAConfig(targets=["all-conv"], exclude=["classifier"], r=4, alpha=8.0))
    assert [n for n, _ in mm.adapted_layers(head)] == ["lateral.0", "lateral.1", "smooth.0"]
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        segmentation_loss(head(features, (16, 16)), target).backward()
        optimizer.step()
    tuned = head(features, (16, 16)).detach()
    assert (tuned - base).abs().max() > 1e-4
    mm.merge(head, unload=True)
    assert type(head.smooth[0]) is torch.nn.Conv2d
    torch.testing.assert_close(head(features, (16, 16)), tuned, rtol=1e-5, atol=1e-5)
