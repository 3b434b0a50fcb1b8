"""Single-token listwise reranking on the default model: the label scores of a sequential
prompt equal one HF transformers forward of the same tokens; with `order_invariant` every
permutation of the passages gives the same scores, equal to an HF forward with the explicit
set-prompting 4D mask and positions (the oracle of test_set_prompting)."""

from __future__ import annotations

import itertools

import pytest
import torch

from decoding.base import InvalidArgument
from reranking.listwise import LABELS, label_token_ids, listwise_prompt, rerank
from engine.prompt import layout
from tests.decoding.test_set_prompting import oracle_layout, set_mask
from tests.factories import make_engine

QUERY = "How does the engine store the keys and values of past tokens?"
PASSAGES = ["The KV cache is split into fixed-size blocks that sequences share by reference.",
            "Bananas are rich in potassium and grow in tropical climates.",
            "Beam search keeps the best hypotheses at every step.",
            "A paged attention kernel reads keys and values from scattered cache blocks."]


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir, num_blocks=256)


def _hf_scores(model, ids, labels, mask=None, positions=None) -> torch.Tensor:
    with torch.inference_mode():
        kwargs = {} if mask is None else {"attention_mask": mask,
                                          "position_ids": torch.tensor([positions])}
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)[labels]


def test_sequential_scores_equal_one_hf_forward(engine, hf_model):
    (ranking,) = rerank(engine, [(QUERY, PASSAGES, False)])
    prompt, label_of = listwise_prompt(engine.tokenizer, QUERY, PASSAGES, order_invariant=False)
    assert label_of == [0, 1, 2, 3]
    ids = layout(prompt, engine.tokenizer.encode).token_ids
    labels = label_token_ids(engine.tokenizer, len(PASSAGES))
    expected = _hf_scores(hf_model, ids, labels)
    torch.testing.assert_close(torch.tensor(ranking.scores), expected, rtol=0, atol=1e-4)
    assert ranking.ranking == sorted(range(4), key=lambda i: (-ranking.scores[i], i))


def test_order_invariant_scores_ignore_the_order(engine, hf_model, hf_tokenizer):
    orders = list(itertools.permutations(range(len(PASSAGES))))
    results = rerank(engine, [(QUERY, [PASSAGES[i] for i in order], True) for order in orders])
    first = None
    for order, result in zip(orders, results):
        by_text = {PASSAGES[i]: s for i, s in zip(order, result.scores)}
        if first is None:
            first = by_text
        assert by_text.keys() == first.keys()
        for text in by_text:
            assert by_text[text] == pytest.approx(first[text], abs=1e-4)
    prompt, label_of = listwise_prompt(engine.tokenizer, QUERY, PASSAGES, order_invariant=True)
    ids, positions, groups = oracle_layout(hf_tokenizer, prompt.segments)
    assert ids == layout(prompt, engine.tokenizer.encode).token_ids
    label_ids = label_token_ids(engine.tokenizer, len(PASSAGES))
    labels = [label_ids[label] for label in label_of]
    expected = _hf_scores(hf_model, ids, labels, set_mask(groups), positions)
    torch.testing.assert_close(torch.tensor(results[0].scores), expected, rtol=0, atol=1e-4)


def test_bad_passage_lists_name_the_field(engine):
    for passages in ([], ["x"] * (len(LABELS) + 1), ["ok", "  "]):
        with pytest.raises(InvalidArgument) as err:
            listwise_prompt(engine.tokenizer, QUERY, passages, order_invariant=True)
        assert err.value.field == "passages"


def test_cli_prints_the_ranking_as_json(engine, model_dir, tmp_path, capsys):
    import json

    from server.cli import main

    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    # float32 like the in-process engine (the CLI's --dtype auto is bfloat16 on AMX /
    # AVX512-BF16 CPUs).
    assert main(["rerank", "--model", str(model_dir), "--query", QUERY, "--passages-file",
                 str(path), "--order-invariant", "--json", "--dtype", "float32"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (expected,) = rerank(engine, [(QUERY, PASSAGES, True)])
    assert printed["ranking"] == expected.ranking
    assert printed["scores"] == pytest.approx(expected.scores, abs=1e-4)
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES * 6))
    assert main(["rerank", "--model", str(model_dir), "--query", QUERY, "--passages-file",
                 str(path)]) == 2


def test_rerank_rpc_equals_offline_and_names_bad_fields(engine, model_dir):
    import grpc

    from server.pb import pb
    from tests.server.conftest import start_server

    served = start_server(model_dir)
    try:
        request = pb.RerankRequest(query=QUERY, passages=PASSAGES, order_invariant=True)
        got = served.stub.Rerank(request)
        (expected,) = rerank(engine, [(QUERY, PASSAGES, True)])
        assert list(got.ranking) == expected.ranking
        assert list(got.scores) == pytest.approx(expected.scores, abs=1e-4)
        assert got.usage.prompt_tokens > 50 and got.request_id
        for bad, field in ((pb.RerankRequest(query="", passages=PASSAGES), "query"),
                           (pb.RerankRequest(query=QUERY), "passages"),
                           (pb.RerankRequest(query=QUERY, passages=PASSAGES * 6), "passages")):
            with pytest.raises(grpc.RpcError) as err:
                served.stub.Rerank(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"{field}:"), err.value.details()
        assert served.wait_idle().kv_blocks_used == 0
    finally:
        served.close()


def test_cli_through_a_server_prints_the_same(engine, model_dir, tmp_path, capsys):
    import json

    from server.cli import main
    from tests.server.conftest import start_server

    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    served = start_server(model_dir)
    try:
        assert main(["rerank", "--server", served.address, "--query", QUERY,
                     "--passages-file", str(path), "--json"]) == 0
    finally:
        served.close()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (expected,) = rerank(engine, [(QUERY, PASSAGES, False)])
    assert printed["ranking"] == expected.ranking
    assert printed["scores"] == pytest.approx(expected.scores, abs=1e-4)
