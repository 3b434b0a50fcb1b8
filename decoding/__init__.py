"""Decoding strategies. Importing the package registers every strategy (see `decoding.base`)."""

from decoding import base, params  # noqa: F401  (base first: strategies register into it)
from decoding import beam_search, contrastive  # noqa: F401
