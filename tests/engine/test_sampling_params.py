import pickle

import msgspec
import pytest

from engine.errors import InvalidArgument
from engine.sampling_params import SamplingParams

# (field that must be blamed, constructor kwargs)
BAD_PARAMS = [
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("max_new_tokens", dict(max_new_tokens=-3)),
    ("min_new_tokens", dict(min_new_tokens=-1)),
    ("min_new_tokens", dict(max_new_tokens=4, min_new_tokens=5)),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=float("inf"))),
    ("top_k", dict(top_k=-1)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=float("nan"))),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=float("inf"))),
    ("frequency_penalty", dict(frequency_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("presence_penalty", dict(presence_penalty=-3.0)),
    ("presence_penalty", dict(presence_penalty=float("nan"))),
    ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={5: 101.0})),
    ("logit_bias", dict(logit_bias={5: float("nan")})),
    ("stop", dict(stop=("ok", ""))),
    ("stop_token_ids", dict(stop_token_ids=(3, -2))),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=2**63)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=21)),
]

GOOD_PARAMS = [
    dict(),
    dict(temperature=0.0),
    dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
    dict(top_p=1.0, min_p=1.0, top_k=0),
    dict(repetition_penalty=1.3, frequency_penalty=-2.0, presence_penalty=2.0),
    dict(max_new_tokens=1, min_new_tokens=1),
    dict(logit_bias={0: -100.0, 7: 100.0}, stop=("\n\n",), stop_token_ids=(0,)),
    dict(seed=0, logprobs=0),
    dict(seed=2**63 - 1, logprobs=20),
]


def _case_id(case) -> str:
    field, kwargs = case
    return f"{field}-{kwargs!r}"


@pytest.mark.parametrize("field, kwargs", BAD_PARAMS, ids=[_case_id(c) for c in BAD_PARAMS])
def test_invalid_value_names_field(field, kwargs):
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("kwargs", GOOD_PARAMS, ids=[repr(k) for k in GOOD_PARAMS])
def test_valid_values_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert not SamplingParams().is_greedy


def test_validate_for_vocab():
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=(99,)).validate_for_vocab(100)
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(logit_bias={100: 1.0}).validate_for_vocab(100)
    assert info.value.field == "logit_bias"
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(stop_token_ids=(5, 100)).validate_for_vocab(100)
    assert info.value.field == "stop_token_ids"


def test_frozen_and_kw_only():
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(16)  # type: ignore[misc]


def test_json_round_trip_validates():
    params = SamplingParams(temperature=0.5, logit_bias={3: -1.5}, stop=("x",), seed=7)
    decoded = msgspec.json.decode(msgspec.json.encode(params), type=SamplingParams)
    assert decoded == params
    # msgspec wraps errors raised in __post_init__; the typed error survives as the cause.
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"top_p": 0}', type=SamplingParams)
    assert isinstance(info.value.__cause__, InvalidArgument)
    assert info.value.__cause__.field == "top_p"


def test_invalid_argument_pickles():
    error = pickle.loads(pickle.dumps(InvalidArgument("top_p", "must be in (0, 1]")))
    assert (error.field, error.reason) == ("top_p", "must be in (0, 1]")
    assert str(error) == "top_p: must be in (0, 1]"
