"""Model runner: turns a SchedulerOutput into one flat forward pass.

It runs a `LoadedModel` and owns its KV cache (or state pool) tensors. Per step it builds
`input_ids`, `positions`, `slot_mapping` and the attention metadata once (shared by every
layer), runs the model, and returns float32 logits only for the rows that are sampled, plus any
activations that those requests asked to capture. The model's memory kind is looked at once, in
the constructor: it picks how the cache is sized, allocated, copied and addressed.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import torch

from engine.execution.attention_metadata import AttentionMetadata, LinearPrefill, PrefillChunk
from engine.config import CacheConfig, ModelConfig
from engine.execution.decode_graphs import DecodeGraphs
from engine.execution.varlen import prepare_varlen
from engine.kernels import backend, layer_ops, paged_attention
from engine.execution.loaded_model import LoadedModel, load_model
from engine.core.scheduler_output import ScheduledRequest, SchedulerOutput


class ModelRunnerOutput(msgspec.Struct, kw_only=True):
    req_ids: list[str]
    """Requests sampled this step, in the row order of `logits`."""
    logits: torch.Tensor
    """[num_sampled, vocab_size] float32."""
    captures: dict[str, dict[str, torch.Tensor]]
    """req_id -> `Capture.name` -> [hidden_size] tensor, for requests that asked."""
    deferred: list[str] = []
    """Requests sampled this step whose logits wait for their strategy's choice
    (`Request.defers_logits`): not in `req_ids`; their LM-head inputs are in `captures`."""
    prompt_chunks: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
    """req_id -> (first position, `Capture.name` -> [num_tokens, hidden_size] float32) for
    requests with all-position captures: the prompt positions computed this step (a chunk of
    a chunked prefill, or of a recompute after preemption; generated tokens are left out)."""


class ModelRunner:
    """Runs a `LoadedModel` and owns its per-layer cache tensors.

    Paged KV models: each layer's cache is `[num_blocks + 1, block_size, num_kv_heads,
    head_dim]` for K and for V; block ids come from the KVCacheManager, which never hands out
    the last (null) block. State-slot models: each layer's state pool is `[num_blocks,
    *state_shape]` float32, one slot per sequence (block ids are slot ids).
    """

    def __init__(self, loaded: LoadedModel | ModelConfig, cache_config: CacheConfig,
                 attention_backend: str = "auto") -> None:
        if isinstance(loaded, ModelConfig):
            loaded, attention_backend = load_model(loaded), loaded.attention_backend
        self.loaded = loaded
        self.use_varlen = False
        self.graphs: DecodeGraphs | None = None
        if loaded.memory == "state_slots":
            self._use_state_slots(cache_config)
        else:
            self._use_paged_kv(cache_config, attention_backend)

    # ---- memory: the one place the memory kind is looked at ----------------------------------

    def _use_paged_kv(self, cache_config: CacheConfig, attention_backend: str) -> None:
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks or self._blocks_for_memory(
            cache_config, self._kv_bytes_per_block())
        self.kv_caches = self._allocate_kv_cache()
        self._cache_tensors = [t for kv in self.kv_caches for t in kv]
        self._prepare = self._prepare_paged
        # The Triton varlen kernel (the GPU path) takes the whole step in one launch per layer.
        self.use_varlen = attention_backend != "torch" and backend(self.device) == "triton"
        if self.use_varlen:
            self._prepare = self._prepare_varlen
        self.use_paged_kernel = (attention_backend != "torch" and self.device.type == "cpu"
                                 and paged_attention.is_available())

    def _use_state_slots(self, cache_config: CacheConfig) -> None:
        # Linear attention: one whole-sequence state slot per sequence, no KV blocks
        # (`block_size` is meaningless, so the facade's arithmetic uses 1).
        self.block_size = 1
        self.num_blocks = cache_config.num_blocks or self._blocks_for_memory(
            cache_config, self._state_bytes_per_slot())
        self.kv_caches = self._allocate_state_pools()
        self._cache_tensors = list(self.kv_caches)
        self._prepare = self._prepare_state
        self.use_paged_kernel = False
        # The Triton lightning kernel takes every plain prompt chunk of a step in one launch.
        self.batch_linear_prefill = backend(self.device) == "triton"

    @staticmethod
    def _blocks_for_memory(cache_config: CacheConfig, bytes_per_block: int) -> int:
        return max(1, cache_config.kv_cache_memory_mib * (1 << 20) // bytes_per_block)

    def _kv_bytes_per_block(self) -> int:
        cfg = self.config
        elem = torch.finfo(self.dtype).bits // 8
        return (2 * cfg.num_hidden_layers * self.block_size * cfg.num_key_value_heads
                * cfg.head_dim * elem)

    def _state_bytes_per_slot(self) -> int:  # float32 states of every layer
        return 4 * sum(math.prod(shape) for shape in self.model.state_shapes())

    def _allocate_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config
        # One extra block at the end: the null block padded gathers read (kept at zero).
        shape = (self.num_blocks + 1, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        with self.device:
            return [(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
                    for _ in range(cfg.num_hidden_layers)]

    def _allocate_state_pools(self) -> list[torch.Tensor]:
        # No spare slot: a state is zeroed or copied before it is read, never padded.
        with self.device:
            return [torch.zeros((self.num_blocks, *shape), dtype=torch.float32)
                    for shape in self.model.state_shapes()]

    def enable_decode_graphs(self, max_batch: int, max_model_len: int,
                             capture: bool | None = None) -> bool:
        """Runs all-decode steps of up to `max_batch` sequences from static buffers, captured
        as CUDA graphs (`capture`, default: on CUDA). Only for the Triton varlen path and
        state-slot models (the CPU gather path's shapes change every step). Returns whether
        graphs are on."""
        if not (self.use_varlen or self.uses_state_slots):
            return False
        self.graphs = DecodeGraphs(
            self.model, self.kv_caches, max_batch=max_batch,
            max_blocks=-(-max_model_len // self.block_size) + 1, null_slot=self.null_slot,
            state_slots=self.uses_state_slots, device=self.device,
            capture=self.device.type == "cuda" if capture is None else capture)
        return True

    # ---- the loaded model, as the runner's attributes ----------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.module

    @property
    def config(self):
        return self.loaded.config

    @property
    def model_dir(self) -> Path:
        return self.loaded.model_dir

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def uses_state_slots(self) -> bool:
        return self.loaded.memory == "state_slots"

    @property
    def null_slot(self) -> int:
        return self.num_blocks * self.block_size

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Performs the step's block copies, then one forward over every scheduled token.

        Returns logits (and requested captures) for the requests whose last known token was
        computed this step, in `req_ids` order; other requests (mid-prefill chunks) get none,
        and those that defer their logits get their captures only.
        """
        # Single-token rows first: they form the batched decode group of the attention.
        items = sorted(output.scheduled, key=_attention_order)
        if self._graph_step(items):
            with self.device:
                self._copy_blocks(output.block_copies)
            hidden, sample_rows, sampled = self._run_graph(items)
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            layer_caps: dict[str, torch.Tensor] = {}
        else:
            # Step inputs (ids, slots, masks) are built on the model's device. The device
            # context intercepts every torch call, so the forward itself runs outside it.
            with self.device:
                self._copy_blocks(output.block_copies)
                input_ids, positions, meta, sample_rows, sampled = self._prepare(items)
                rows = torch.tensor(sample_rows, dtype=torch.long)
            hidden, layer_caps = self.model(input_ids, positions, self.kv_caches, meta,
                                            self._capture_layers(items))
        sampled_hidden = hidden[rows]
        captures = self._gather_captures(sampled, rows, sampled_hidden, layer_caps)
        defers = [s.request.defers_logits for s in sampled]
        eager = [i for i, d in enumerate(defers) if not d]
        if len(eager) < len(sampled):
            sampled_hidden = sampled_hidden[torch.tensor(eager, dtype=torch.long,
                                                         device=sampled_hidden.device)]
        return ModelRunnerOutput(req_ids=[sampled[i].request.req_id for i in eager],
                                 logits=self.model.compute_logits(sampled_hidden),
                                 captures=captures,
                                 deferred=[s.request.req_id for s, d in zip(sampled, defers)
                                           if d],
                                 prompt_chunks=self._prompt_chunks(items, hidden, layer_caps))

    def _graph_step(self, items: list[ScheduledRequest]) -> bool:
        return (self.graphs is not None and 0 < len(items) <= self.graphs.max_batch and
                all(_is_decode(i) and not i.request.captures for i in items))

    def _run_graph(self, items: list[ScheduledRequest]):
        """An all-decode step from the decode graphs' static buffers."""
        batch = _TokenBatch()
        slots, lens, tables = [], [], []
        bs = self.block_size
        for item in items:
            _, start, end = batch.add(item)
            table = item.block_ids
            slots.append(table[0] if self.uses_state_slots else
                         table[start // bs] * bs + start % bs)
            lens.append(end)
            tables.append(table)
        hidden = self.graphs.run(batch.input_ids, batch.positions, slots, lens, tables)
        return hidden, batch.sample_rows, batch.sampled

    def _prompt_chunks(self, items: list[ScheduledRequest], hidden: torch.Tensor,
                       layer_caps: dict[str, torch.Tensor]):
        """The all-position captures of this step's prompt tokens, per request that asked."""
        chunks = {}
        num_layers = self.config.num_hidden_layers
        q_start = 0
        for item in items:
            req, first = item.request, q_start
            q_start += item.num_new_tokens
            wanted = [c for c in req.captures if c.all_positions]
            start = req.num_computed_tokens
            num_rows = min(start + item.num_new_tokens, req.num_prompt_tokens) - start
            if not wanted or num_rows <= 0:
                continue
            out = {}
            for capture in wanted:
                source = hidden if capture.kind == "final_hidden" else \
                    layer_caps[f"ffn_input:{capture.layer % num_layers}"]
                # A copy: a view would keep the whole step's activations alive until the
                # request's prompt is complete.
                out[capture.name] = source[first:first + num_rows].to(torch.float32, copy=True)
            chunks[req.req_id] = (start, out)
        return chunks

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        if not copies:
            return
        layer_ops.copy_blocks(self._cache_tensors, copies)

    def _prepare_paged(self, items: list[ScheduledRequest]):
        """Inputs of a paged-KV model: every new token's KV slot, and the decode rows' block
        tables (paged kernel) or context slots (gather path)."""
        bs = self.block_size
        batch = _TokenBatch()
        slots: list[int] = []
        # Per sequence whose tokens are rows of the paged kernel: its table, its context
        # length after the step, and its number of rows (1 for a decode row).
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        decode_rows: list[int] = []
        prefills: list[PrefillChunk] = []
        for item in items:
            q_start, start, end = batch.add(item)
            table = item.block_ids
            if _is_decode(item):
                slots.append(table[start // bs] * bs + start % bs)
            else:  # one tensor op for a whole chunk's slots, no per-token Python loop
                slots += self._context_slots(table, end)[start:].tolist()
                if not (self.use_paged_kernel and _attention_order(item) == 1):
                    prefills.append(self._prefill_chunk(q_start, start, end, table,
                                                        item.request))
                    continue
                # A plain prompt chunk: each token is one more row of the paged kernel over
                # its own prefix (the step writes every new K/V before attending), which is
                # causal attention; its rows follow the decode rows (`_attention_order`).
                assert q_start == sum(decode_rows), "plain chunks after decode rows only"
            decode_tables.append(table)
            decode_lens.append(end)
            decode_rows.append(end - start)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decode_tokens=sum(decode_rows),
            decode_slots=None, decode_mask=None, prefills=prefills)
        if decode_lens and self.use_paged_kernel:
            meta.decode_block_tables, meta.decode_context_lens = self._decode_tables(
                decode_tables, decode_lens, decode_rows)
        elif decode_lens:  # decode rows only: plain chunks are rows on the paged kernel alone
            meta.decode_slots, meta.decode_mask = self._decode_slots(decode_tables, decode_lens)
        return batch.inputs(meta)

    def _prepare_varlen(self, items: list[ScheduledRequest]):
        """Inputs of a paged-KV model on the Triton backend: the step as one varlen batch."""
        batch = _TokenBatch()
        meta = prepare_varlen(items, self.block_size, self.config.num_key_value_heads,
                              batch.add)
        return batch.inputs(meta)

    def _prepare_state(self, items: list[ScheduledRequest]):
        """Inputs of a state-slot model: each sequence's slot instead of per-token KV slots.
        A sequence computing its first token starts from a zeroed slot."""
        batch = _TokenBatch()
        decode_slots: list[int] = []
        fresh_slots: list[int] = []
        prefills: list[PrefillChunk] = []
        plain: list[tuple[int, int, int]] = []  # (first row, length, slot) of batched chunks
        for item in items:
            q_start, start, end = batch.add(item)
            req, slot = item.request, item.block_ids[0]
            if start == 0:
                fresh_slots.append(slot)
            if _is_decode(item):
                decode_slots.append(slot)
                continue
            mask = None
            if req.needs_structure_mask(start, end):  # a structured prompt's sets
                assert start == 0, "a structured prompt split before its last set member"
                mask = _chunk_mask(req, 0, min(end, req.layout.member_span[1]))  # then sequential
            if mask is None and self.batch_linear_prefill:
                plain.append((q_start, end - start, slot))
                continue
            prefills.append(PrefillChunk(q_start=q_start, q_len=end - start,
                                         num_context_tokens=start, mask=mask, state_slot=slot))
        if fresh_slots:
            fresh = torch.tensor(fresh_slots, dtype=torch.long)
            for pool in self.kv_caches:
                pool[fresh] = 0
        meta = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(decode_slots),
            state_slots=torch.tensor(decode_slots, dtype=torch.long), prefills=prefills)
        if plain:
            starts, lengths, slots = (torch.tensor(column) for column in zip(*plain))
            q_starts = torch.zeros(len(plain) + 1, dtype=torch.long)
            torch.cumsum(lengths, 0, out=q_starts[1:])
            rows = torch.arange(sum(n for _, n, _ in plain)) + torch.repeat_interleave(
                starts - q_starts[:-1], lengths)
            meta.linear_prefill = LinearPrefill(rows=rows, q_starts=q_starts, slots=slots)
        return batch.inputs(meta)

    def _context_slots(self, table: list[int], num_tokens: int) -> torch.Tensor:
        blocks = torch.tensor(table[:(num_tokens + self.block_size - 1) // self.block_size],
                              dtype=torch.long)
        slots = blocks[:, None] * self.block_size + torch.arange(self.block_size)
        return slots.flatten()[:num_tokens]

    def _prefill_chunk(self, q_start: int, start: int, end: int, table: list[int],
                       req) -> PrefillChunk:
        q_len = end - start
        structured = req.needs_structure_mask(start, end)
        if start == 0 and not structured:
            return PrefillChunk(q_start=q_start, q_len=q_len, num_context_tokens=0)
        return PrefillChunk(q_start=q_start, q_len=q_len, num_context_tokens=start,
                            context_slots=self._context_slots(table, end) if start else None,
                            mask=_chunk_mask(req, start, end))

    def _decode_tables(self, tables: list[list[int]], lens: list[int], rows: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per kernel row: its sequence's block table and its context length (a sequence's
        `rows` rows are its last tokens, the last one at context length `lens`)."""
        max_blocks = max(len(t) for t in tables)
        # Padding entries are never read: the kernel stops at each sequence's context length.
        padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables],
                              dtype=torch.long)
        lens_t = torch.tensor(lens, dtype=torch.long)
        if len(rows) == sum(rows):  # decode rows only
            return padded, lens_t
        counts = torch.tensor(rows, dtype=torch.long)
        first_row = torch.cumsum(counts, 0) - counts
        # row r of a sequence with n rows ending at length L attends to L - n + 1 + r tokens
        offset = torch.arange(int(counts.sum())) - first_row.repeat_interleave(counts)
        context = (lens_t - counts + 1).repeat_interleave(counts) + offset
        return padded.repeat_interleave(counts, dim=0), context

    def _decode_slots(self, tables: list[list[int]], lens: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        max_len = max(lens)
        max_blocks = (max_len + self.block_size - 1) // self.block_size
        # Pad block tables with the null block; one gather per step builds all slot ids.
        padded = [t[:max_blocks] + [self.num_blocks] * (max_blocks - min(len(t), max_blocks))
                  for t in tables]
        blocks = torch.tensor(padded, dtype=torch.long)                 # [B, max_blocks]
        slots = (blocks[:, :, None] * self.block_size
                 + torch.arange(self.block_size)).flatten(1)[:, :max_len]  # [B, max_len]
        lens_t = torch.tensor(lens, dtype=torch.long)
        mask = torch.arange(max_len)[None, :] < lens_t[:, None]           # [B, max_len]
        slots = torch.where(mask, slots, self.null_slot)
        return slots, mask[:, None, None, :]

    def _capture_layers(self, items: list[ScheduledRequest]) -> frozenset[int]:
        """Layers whose FFN input some item captures (a mid-prefill chunk's all-position
        capture included). Capturing only keeps a reference to a tensor the layer computes
        anyway."""
        num_layers = self.config.num_hidden_layers
        layers = set()
        for item in items:
            for capture in item.request.captures:
                if capture.kind == "ffn_input":
                    layers.add(capture.layer % num_layers)
        return frozenset(layers)

    def _gather_captures(self, sampled, rows, sampled_hidden, layer_caps):
        captures: dict[str, dict[str, torch.Tensor]] = {}
        num_layers = self.config.num_hidden_layers
        for i, item in enumerate(sampled):
            req = item.request
            if not req.captures:
                continue
            out = {}
            for capture in req.captures:
                if capture.all_positions:
                    continue
                if capture.kind == "final_hidden":
                    out[capture.name] = sampled_hidden[i].float().clone()
                else:
                    layer = capture.layer % num_layers
                    out[capture.name] = layer_caps[f"ffn_input:{layer}"][rows[i]].float().clone()
            captures[req.req_id] = out
        return captures



def _is_decode(item: ScheduledRequest) -> bool:
    """A single new token that may attend to every earlier token (not a set member)."""
    if item.num_new_tokens != 1:
        return False
    start = item.request.num_computed_tokens
    return not item.request.needs_structure_mask(start, start + 1)


def _attention_order(item: ScheduledRequest) -> int:
    """0: a decode row; 1: a plain prompt chunk (causal over its prefix); 2: a chunk with set
    members (its own mask)."""
    if _is_decode(item):
        return 0
    start = item.request.num_computed_tokens
    return 2 if item.request.needs_structure_mask(start, start + item.num_new_tokens) else 1


class _TokenBatch:
    """The flat token stream of one step: ids and positions of every scheduled item in order,
    and the rows (and items) whose logits are sampled."""

    def __init__(self) -> None:
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.sample_rows: list[int] = []
        self.sampled: list[ScheduledRequest] = []

    def add(self, item: ScheduledRequest) -> tuple[int, int, int]:
        """Appends the item's new tokens; returns (first row, start token, end token)."""
        req, start = item.request, item.request.num_computed_tokens
        end = start + item.num_new_tokens
        q_start = len(self.input_ids)
        self.input_ids += req.all_token_ids[start:end]
        self.positions += req.positions(start, end)
        if item.samples:
            self.sample_rows.append(len(self.input_ids) - 1)
            self.sampled.append(item)
        return q_start, start, end

    def inputs(self, meta: AttentionMetadata):
        return (torch.tensor(self.input_ids, dtype=torch.long),
                torch.tensor(self.positions, dtype=torch.long), meta, self.sample_rows,
                self.sampled)


def _chunk_mask(req, start: int, end: int) -> torch.Tensor:
    """[1, 1, end - start, end] bool: query i (token start + i) may see tokens 0 .. start + i,
    except other members of its parallel set."""
    key_idx = torch.arange(end)
    query_idx = torch.arange(start, end)
    mask = key_idx[None, :] <= query_idx[:, None]
    if req.needs_structure_mask(start, end):
        mask &= ~_other_members(req.layout, start, end)
    return mask[None, None]


def _other_members(layout, start: int, end: int) -> torch.Tensor:
    """[end - start, end] bool: True where query token and key token are different members of
    the same parallel set (Set-Based Prompting forbids that attention)."""
    n = len(layout.set_ids)
    pad = max(0, end - n)
    sets = torch.tensor(layout.set_ids[:end] + [-1] * pad)
    members = torch.tensor(layout.member_ids[:end] + [-1] * pad)
    q_sets, q_members = sets[start:end, None], members[start:end, None]
    return (q_sets >= 0) & (q_sets == sets[None, :]) & (q_members != members[None, :])
