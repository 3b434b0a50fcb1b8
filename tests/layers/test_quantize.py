"""Weight-only int8 and int4 linears: exact against their own dequantized weights (int4: the
Q4_1 grid of llama.cpp, re-quantized without loss), and close to the float32 model on the real
default model (same greedy token, small KL)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers.quantize import (INT4_GROUP, Int4WeightOnlyLinear, Int8WeightOnlyLinear,
                                    quantize_linears)
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


def _int4_dequantized(q: Int4WeightOnlyLinear) -> torch.Tensor:
    """The layer's weights as its kernel sees them: its product with the identity."""
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    return q(eye).float().t()                                      # [out, in]


def test_int4_linear_matches_the_q4_1_formula():
    # Brute force: w ~= (q - 8) * scale + zero per group of 32 inputs, q = round((w - min) /
    # scale), scale = (max - min) / 15, zero = min + 8 scale (scale and zero in bfloat16).
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=False).to(torch.bfloat16)
    q = Int4WeightOnlyLinear(linear)
    w = linear.weight.float().view(48, -1, INT4_GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low) / 15
    codes = torch.round((w - low) / scale).clamp(0, 15)
    scale_bf, zero_bf = (t.to(torch.bfloat16).float() for t in (scale, low + 8 * scale))
    expected = ((codes - 8) * scale_bf + zero_bf).view(48, 128)
    torch.testing.assert_close(_int4_dequantized(q), expected.bfloat16().float(), atol=0,
                               rtol=1e-2)
    # Within half a step of the float weights (plus bfloat16 rounding of scale and zero).
    assert ((_int4_dequantized(q) - linear.weight.float()).abs().view(48, -1, INT4_GROUP)
            <= scale * 0.5 + 0.02 * w.abs().amax(-1, keepdim=True)).all()
    x = torch.randn(5, 128).to(torch.bfloat16)
    torch.testing.assert_close(q(x).float(), x.float() @ _int4_dequantized(q).t(), atol=5e-2,
                               rtol=2e-2)


def test_int4_requantizes_a_q4_1_grid_without_loss():
    # Weights already on Q4_1 grids (each block holding its codes 0 and 15, as a converted GGUF
    # does) come back exactly: same min, same step, same codes.
    torch.manual_seed(1)
    out, inp = 32, 96
    codes = torch.randint(0, 16, (out, inp // INT4_GROUP, INT4_GROUP))
    codes[..., 0], codes[..., 1] = 0, 15
    step = 2.0 ** -torch.randint(4, 9, (out, inp // INT4_GROUP, 1)).float()
    low = torch.randint(-64, 0, (out, inp // INT4_GROUP, 1)).float() * step
    weight = (codes * step + low).view(out, inp)
    linear = nn.Linear(inp, out, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    assert torch.equal(_int4_dequantized(Int4WeightOnlyLinear(linear)), weight)


def test_int4_refuses_float32():
    with pytest.raises(ValueError, match="bfloat16"):
        Int4WeightOnlyLinear(nn.Linear(64, 8, bias=False))


def test_quantize_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    assert quantize_linears(model, "int8") == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    model = nn.Module()
    model.proj, model.lm_head = (nn.Linear(64, 64, bias=False).to(torch.bfloat16)
                                 for _ in range(2))
    assert quantize_linears(model, "int4") == 2
    assert isinstance(model.proj, Int4WeightOnlyLinear)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="quantization"):
        quantize_linears(model, "int3")


# The default model's layers are Q4_1 in its GGUF file, so int4 re-quantizes them to the same
# grid; its LM head is int8 (4 bits there cost KL up to 0.08 and a swapped first token).
@pytest.mark.parametrize("quantization,dtype", [("int8", "float32"), ("int4", "bfloat16")])
def test_quantized_model_tracks_float32_on_real_weights(model_dir, quantization, dtype):
    reference = make_engine(model_dir, num_blocks=64)
    quantized = make_engine(model_dir, num_blocks=64, quantization=quantization, dtype=dtype)
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
        assert kl < 0.02, f"{prompt!r}: KL(fp32 || {quantization}) = {kl:.4f}"


def _first_step_logits(engine, req, seq) -> torch.Tensor:
    from engine.core.scheduler_output import ScheduledRequest, SchedulerOutput

    engine.kv_cache.allocate_slots(req.req_id, seq, 0, len(seq))
    item = ScheduledRequest(request=req, num_new_tokens=len(seq), samples=True,
                            block_ids=engine.kv_cache.get_block_ids(req.req_id))
    out = engine.runner.execute(SchedulerOutput(scheduled=[item]))
    engine.kv_cache.free(req.req_id)
    return out.logits[0]
