"""CUDA graphs of all-decode steps: the whole forward of a decode step (every layer's kernels)
recorded once per batch size at start-up and replayed, so a step costs one graph launch instead
of hundreds of kernel launches from Python.

A graph replays fixed addresses, so a step's inputs are copied into static buffers sized for
the largest captured batch, and a batch of n runs the graph of the smallest captured size
b >= n with rows n..b padded: their K/V go to the null slot (never read), their sequence length
is 1, and their state slot is -1 (the lightning decode kernel skips it). Steps with a prefill
chunk, a set-structured token or an activation capture run eagerly.

On a machine without CUDA the same buffers and padding run eagerly (`capture=False`): that is
how the padding logic is tested on the CPU.
"""

from __future__ import annotations

import torch

from engine.execution.attention_metadata import AttentionMetadata, VarlenMetadata

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Static decode-step buffers plus one runnable (a graph replay, or the eager forward) per
    captured batch size."""

    def __init__(self, model, kv_caches, *, max_batch: int, max_blocks: int, null_slot: int,
                 state_slots: bool, device: torch.device, capture: bool) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.state_slots = state_slots
        self.null_slot = null_slot
        self.sizes = [b for b in BATCH_SIZES if b <= max_batch] or [max_batch]
        top = self.sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(top, dtype=torch.long)
            self.positions = torch.zeros(top, dtype=torch.long)
            self.slot_mapping = torch.full((top,), null_slot, dtype=torch.long)
            self.q_starts = torch.arange(top + 1, dtype=torch.int32)
            self.seq_lens = torch.ones(top, dtype=torch.int32)
            self.block_tables = torch.zeros(top, max(1, max_blocks), dtype=torch.int32)
            self.slots = torch.full((top,), -1, dtype=torch.long)
        self.pool = None
        self.runs = {}
        for b in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            self.runs[b] = self._capture(b) if capture else (lambda b=b: self._forward(b))

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        if self.state_slots:
            return AttentionMetadata(slot_mapping=self.slot_mapping[:0], num_decode_tokens=b,
                                     prefills=[], state_slots=self.slots[:b])
        varlen = VarlenMetadata(q_starts=self.q_starts[:b + 1], seq_lens=self.seq_lens[:b],
                                block_tables=self.block_tables[:b], max_q_len=1)
        return AttentionMetadata(slot_mapping=self.slot_mapping[:b], num_decode_tokens=0,
                                 prefills=[], varlen=varlen)

    def _forward(self, b: int) -> torch.Tensor:
        hidden, _ = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches,
                               self._meta(b))
        return hidden

    def _capture(self, b: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, allocators settle
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay

    def run(self, input_ids: list[int], positions: list[int], new_slots: list[int],
            seq_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode step of n <= max_batch sequences; returns hidden [n, hidden_size].
        new_slots: each row's KV slot (paged models) or state slot (state-slot models)."""
        n = len(input_ids)
        b = next(size for size in self.sizes if size >= n)
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        if self.state_slots:
            self.slots[:n].copy_(torch.tensor(new_slots), non_blocking=True)
            self.slots[n:b] = -1
        else:
            self.slot_mapping[:n].copy_(torch.tensor(new_slots), non_blocking=True)
            self.slot_mapping[n:b] = self.null_slot
            self.seq_lens[:n].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
            self.seq_lens[n:b] = 1
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            self.block_tables[:n, :width].copy_(torch.tensor(padded, dtype=torch.int32),
                                                non_blocking=True)
        return self.runs[b]()[:n]
