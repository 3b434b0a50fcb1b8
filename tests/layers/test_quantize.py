"""Weight-only int8 linears: exact against their own dequantized weights, and close to the
float32 model on the real default model (same greedy token, small KL)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers.quantize import Int8WeightOnlyLinear, quantize_linears
from engine.core.request import Request
from tests.factories import make_engine

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Water boils at",
           "The opposite of hot is"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_matches_dequantized_weights(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False).to(dtype)
    q = Int8WeightOnlyLinear(linear)
    x = torch.randn(5, 96).to(dtype)
    dequant = q.weight_int8.float() * q.scales.float()[:, None]
    # Half a step of rounding, plus (bf16) the rounding of the stored scale itself.
    step = q.scales.float().max()
    bound = step / 2 + 1e-6 if dtype == torch.float32 else step
    assert (dequant - linear.weight.float()).abs().max() <= bound
    ref = x.float() @ dequant.t()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(q(x).float(), ref, atol=tol, rtol=tol)


def test_quantize_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    assert quantize_linears(model, "int8") == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with pytest.raises(ValueError, match="quantization"):
        quantize_linears(model, "int3")


def test_int8_model_tracks_float32_on_real_weights(model_dir):
    reference = make_engine(model_dir, num_blocks=64)
    quantized = make_engine(model_dir, num_blocks=64, quantization="int8")
    for prompt in PROMPTS:
        logits = []
        for engine in (reference, quantized):
            gen = engine.make_request(prompt)
            req = Request(gen.req_id, gen.prompt_token_ids, generation=gen)
            seq = engine.tokenizer.encode(prompt)
            logits.append(_first_step_logits(engine, req, seq))
        p_ref, p_q = (torch.log_softmax(lg, -1) for lg in logits)
        kl = torch.sum(p_ref.exp() * (p_ref - p_q)).item()
        assert logits[0].argmax() == logits[1].argmax(), prompt
        assert kl < 0.02, f"{prompt!r}: KL(fp32 || int8) = {kl:.4f}"


def _first_step_logits(engine, req, seq) -> torch.Tensor:
    from engine.core.scheduler_output import ScheduledRequest, SchedulerOutput

    engine.kv_cache.allocate_slots(req.req_id, seq, 0, len(seq))
    item = ScheduledRequest(request=req, num_new_tokens=len(seq), samples=True,
                            block_ids=engine.kv_cache.get_block_ids(req.req_id))
    out = engine.runner.execute(SchedulerOutput(scheduled=[item]))
    engine.kv_cache.free(req.req_id)
    return out.logits[0]
