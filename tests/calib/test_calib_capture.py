"""Layer capture vs independent recomputation: the captured block output equals the block run
again on the captured input, the logits equal `output_router_logits`, the budget is exact."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model

from moekit.calib.capture import capture_layers, moe_blocks
from moekit.families.registry import resolve


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_capture_matches_block_and_router_logits(model_type):
    model = build_model(model_type)
    family = resolve(model.config.to_dict()).family
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 256, (2, 9), generator=gen) for _ in range(3)]
    caps = capture_layers(model, family, batches, max_tokens=30)
    with torch.no_grad():
        ref = model(torch.cat(batches[:2]), output_router_logits=True, use_cache=False)
    blocks = {b.layer: b for b in moe_blocks(model, family)}
    assert sorted(caps) == sorted(blocks)
    for position, (layer, cap) in enumerate(sorted(caps.items())):
        assert cap.num_tokens == 30
        torch.testing.assert_close(cap.logits, ref.router_logits[position][:30].float())
        with torch.no_grad():
            again = blocks[layer].block(cap.inputs.unsqueeze(0))
        again = again[0] if isinstance(again, tuple) else again
        torch.testing.assert_close(cap.outputs, again.reshape(-1, again.shape[-1]),
                                   rtol=1e-5, atol=1e-6)


def test_capture_one_layer_stops_early():
    model = build_model("qwen3_moe")
    family = resolve(model.config.to_dict()).family
    caps = capture_layers(model, family, [torch.randint(3, 256, (1, 8))], max_tokens=100,
                          layers=[0], outputs=False)
    assert list(caps) == [0] and caps[0].outputs is None and caps[0].num_tokens == 8
