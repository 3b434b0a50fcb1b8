import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.pipeline.detokenizer import IncrementalDetokenizer, StopChecker, StopMatch


# (prompt, output) pairs; outputs are decoded on their own by the oracle, so each starts the way
# a generated continuation would (usually with a space).
DECODE_CASES = [
    ("Hello, my name is", " John and I like pizza."),
    ("Translate to French:", " Je m'appelle Émile, où est la gare ?"),
    ("Emoji:", " 🦜🧑\u200d🚀 party 🎉!"),
    ("日本語:", " 日本語のテキストです。漢字"),
    ("Code:\n", "def f(x):\n    return x  +  1\n\n\tprint( 'hi' )  \n"),
    ("Math", " ∫ x² dx = x³/3 + C ≈ Ω"),
    ("", "No prompt at all"),
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello there!<|im_end|>"),
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def make_detokenizer(tokenizer, prompt: str, **kwargs) -> IncrementalDetokenizer:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    """Feed tokens until done or stopped; checks that streamed text is never cut later."""
    deltas = []
    for token_id in token_ids:
        deltas.append(detokenizer.add_token(token_id))
        assert detokenizer.output_text.startswith("".join(deltas))
        if detokenizer.is_stopped:
            break
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False], ids=["skip", "keep"])
@pytest.mark.parametrize("prompt, output", DECODE_CASES, ids=[f"case{i}" for i in range(8)])
def test_deltas_concatenate_to_full_decode(tokenizer, prompt, output, skip_special_tokens):
    output_ids = tokenizer.encode(output, add_special_tokens=False)
    detokenizer = make_detokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = stream(detokenizer, output_ids)
    assert detokenizer.flush() == ""  # nothing is held back without stop strings
    expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == detokenizer.output_text == expected
    assert not any("\ufffd" in delta for delta in deltas)


def test_multi_token_characters_are_buffered(tokenizer):
    output_ids = tokenizer.encode(" 🦜🧑\u200d🚀", add_special_tokens=False)
    assert len(output_ids) > 4  # byte-level BPE splits these emoji into several tokens
    deltas = stream(make_detokenizer(tokenizer, "Emoji:"), output_ids)
    assert "" in deltas
    assert [d for d in deltas if d] == [" 🦜", "🧑", "\u200d", "🚀"]


def test_prompt_ending_mid_character(tokenizer):
    ids = tokenizer.encode("Hi 🦜🧑\u200d🚀 there", add_special_tokens=False)
    for cut in range(len(ids)):
        detokenizer = IncrementalDetokenizer(tokenizer, ids[:cut])
        deltas = stream(detokenizer, ids[cut:])
        # The prompt's own text must never leak into the output.
        assert "".join(deltas) == tokenizer.decode(ids[cut:]), cut


def test_special_tokens_skipped(tokenizer):
    detokenizer = make_detokenizer(tokenizer, "Hi")
    eos = tokenizer.eos_token_id
    assert detokenizer.add_token(eos) == ""
    detokenizer = make_detokenizer(tokenizer, "Hi", skip_special_tokens=False)
    assert detokenizer.add_token(eos) == tokenizer.eos_token


def test_stop_string_spanning_tokens(tokenizer):
    output = " The answer is 42, final."
    output_ids = tokenizer.encode(output, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in output_ids]
    assert not any("swer is 4" in piece for piece in pieces)  # really spans tokens
    detokenizer = make_detokenizer(tokenizer, "Q:", stop=("swer is 4",))
    deltas = stream(detokenizer, output_ids)
    assert detokenizer.stop_str == "swer is 4"
    assert "".join(deltas) == detokenizer.output_text == " The an"
    assert len(deltas) < len(output_ids)  # stopped early
    assert detokenizer.flush() == ""


def test_stop_string_included_in_output(tokenizer):
    output_ids = tokenizer.encode(" The answer is 42, final.", add_special_tokens=False)
    detokenizer = make_detokenizer(tokenizer, "Q:", stop=("is 42",),
                                   include_stop_str_in_output=True)
    deltas = stream(detokenizer, output_ids)
    assert "".join(deltas) == detokenizer.output_text == " The answer is 42"


def test_held_back_text_released_by_flush(tokenizer):
    output_ids = tokenizer.encode(" I like apple", add_special_tokens=False)
    detokenizer = make_detokenizer(tokenizer, "Food:", stop=("apple pie", "xyz"))
    deltas = stream(detokenizer, output_ids)
    assert not detokenizer.is_stopped
    assert "".join(deltas) == " I like "  # "apple" could still become "apple pie"
    assert detokenizer.flush() == "apple"
    assert detokenizer.output_text == " I like apple"


def test_add_token_after_stop_is_an_error(tokenizer):
    detokenizer = make_detokenizer(tokenizer, "Q:", stop=(" answer",))
    stream(detokenizer, tokenizer.encode(" The answer", add_special_tokens=False))
    assert detokenizer.is_stopped
    with pytest.raises(AssertionError):
        detokenizer.add_token(tokenizer.encode(" is", add_special_tokens=False)[0])


# --- StopChecker on plain strings -------------------------------------------------------------

def test_stop_checker_first_completed_match_wins():
    checker = StopChecker(("abcd", "bc"))
    # As if characters arrived one by one, "bc" completes before "abcd".
    assert checker.find("xxabcd", num_new_chars=4) == StopMatch("bc", 3)
    # Same end: the longer match wins.
    assert StopChecker(("cd", "bcd")).find("abcd", 4) == StopMatch("bcd", 1)
    assert StopChecker(("cd",), include_stop_str_in_output=True).find("abcd", 1) == \
        StopMatch("cd", 4)
    assert checker.find("xxab", 1) is None


def test_stop_checker_hold_back():
    checker = StopChecker(("hello world", "wor"))
    assert checker.num_held_back("say hello w") == len("hello w")
    assert checker.num_held_back("say wo") == 2
    assert checker.num_held_back("say w") == 1
    assert checker.num_held_back("say x") == 0
    assert checker.num_held_back("") == 0


def _brute_force_stop(text: str, stop: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """Reveal characters one by one; the first stop string to complete ends the text."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            stop_str = max(done, key=len)
            return text[:end] if include else text[:end - len(stop_str)], stop_str
    return text, None


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab é🦜\n", min_size=1, max_size=40),
       stop=st.lists(st.text(alphabet="ab é", min_size=1, max_size=4), min_size=1,
                     max_size=3).map(tuple),
       include=st.booleans())
def test_streamed_stop_matches_brute_force(tokenizer, text, stop, include):
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(output_ids)
    detokenizer = make_detokenizer(tokenizer, "x", stop=stop, include_stop_str_in_output=include)
    streamed = "".join(stream(detokenizer, output_ids))
    if not detokenizer.is_stopped:
        streamed += detokenizer.flush()
    expected_text, expected_stop = _brute_force_stop(full, stop, include)
    assert (streamed, detokenizer.stop_str) == (expected_text, expected_stop)
    assert detokenizer.output_text == expected_text
