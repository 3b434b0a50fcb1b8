"""From logits to the client: the decoding pipeline (`Sampler`: transforms and batchable
selection; `StrategyRunner`: per-generation strategies), the `StrategyPort` its decisions go
through, the client-visible `Generation`, and output (detokenizer, output processor)."""
