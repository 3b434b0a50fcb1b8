"""One engine for the datastore tests: small windows of a few short KJV books keep the set
fast; a 160-token step budget splits windows across steps (chunked prefill) while batching
several per step."""

from __future__ import annotations

import pytest

from tests.factories import make_engine

WINDOW, STRIDE = 128, 96


@pytest.fixture(scope="session")
def retrieval_engine(model_dir):
    return make_engine(model_dir, max_num_batched_tokens=160, max_num_seqs=16)
