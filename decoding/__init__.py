"""Decoding plug-ins. Importing the package registers every built-in (see `decoding.registry`):
the transforms of `decoding.transforms`, kNN-LM (`decoding.knn`) and constraint masks
(`decoding.constraint`), and the strategies greedy,
sampling, contrastive, beam and awrs, in that order (the order `GetModelInfo.strategies` and
`--strategy` list them)."""

from decoding import base, registry  # noqa: F401  (first: plug-ins register into them)
from decoding import params, transforms  # noqa: F401
from decoding import sampling  # noqa: F401  (greedy, sampling)
from decoding import contrastive, beam_search  # noqa: F401
from decoding import awrs  # noqa: F401  (adaptive weighted rejection sampling + SMC)
from decoding import rankgen  # noqa: F401  (scorer-in-the-loop beam search)
from decoding import knn  # noqa: F401  (the kNN-LM transform)
from decoding import constraint  # noqa: F401  (grammar masks)
