"""A flex-attention BlockMask for packed rows, built from the batch's block boundaries at block granularity.

Packed utterances (and each row's padding tail) are blocks of their own: a position attends causally within its
block only. flex_attention computes only the (query tile, key tile) pairs this mask lists, so the tiles between
different utterances are skipped rather than computed and masked, and tiles wholly inside one utterance and
wholly below the diagonal run without evaluating the mask per element.

transformers would build an equivalent mask from the position ids by itself (packed-sequence detection), but
through `create_block_mask`, which evaluates the mask at every (q, kv) pair of every row (compiled on each new
length). Here the tile tables come from per-tile first/last document ids: (rows x tiles x tiles) work, no L x L
tensor, done once per batch and shared by every layer.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask


def document_ids(cu_seq_lens: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """(rows, length) int32: the index of the block each position belongs to. Blocks never cross rows (every row's
    blocks, its padding tail included, sum to `length`)."""
    flat = torch.arange(rows * length, device=cu_seq_lens.device)
    return torch.searchsorted(cu_seq_lens[1:].long(), flat, right=True).view(rows, length).int()


def _first_first_order(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) in BlockMask's layout: per query tile, the selected key tiles first, in ascending order."""
    counts = selected.sum(-1, dtype=torch.int32)
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices.int()
    return counts.unsqueeze(1).contiguous(), order.unsqueeze(1).contiguous()


def packed_causal_block_mask(cu_seq_lens: torch.Tensor, rows: int, length: int, device: torch.device | str,
                             tile: int = _DEFAULT_SPARSE_BLOCK_SIZE) -> BlockMask:
    """The BlockMask of `rows` rows of `length` positions whose blocks end at `cu_seq_lens` (flattened rows)."""
    cu_seq_lens = cu_seq_lens.to(device)  # computed where the batch is: no device-to-host sync
    docs = document_ids(cu_seq_lens, rows, length)
    tiles = -(-length // tile)
    padded = torch.cat([docs, docs[:, -1:].expand(rows, tiles * tile - length) + 1], 1)  # the tail: a block of its own
    first, last = padded[:, ::tile], padded[:, tile - 1::tile]  # ids only grow along a row
    q_first, q_last = first.unsqueeze(2), last.unsqueeze(2)
    k_first, k_last = first.unsqueeze(1), last.unsqueeze(1)
    at_or_below = torch.ones(tiles, tiles, dtype=torch.bool, device=padded.device).tril()
    overlapping = at_or_below & (k_first <= q_last) & (k_last >= q_first)
    # Full: one block spans both tiles and the key tile lies wholly before the query tile (no causal cut).
    one_block = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    full = overlapping & one_block & ~torch.eye(tiles, dtype=torch.bool, device=padded.device)
    partial = overlapping & ~full
    kv_num, kv_idx = _first_first_order(partial)
    full_num, full_idx = _first_first_order(full)

    def same_block_causal(batch, head, q, kv):
        return (q >= kv) & (padded[batch, q] == padded[batch, kv])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=same_block_causal, seq_lengths=(length, length))


def computed_fraction(mask: BlockMask) -> float:
    """The share of the (rows x tiles x tiles) query/key tile pairs flex_attention computes under `mask`."""
    rows, _, q_tiles = mask.kv_num_blocks.shape
    computed = mask.kv_num_blocks.sum() + (mask.full_kv_num_blocks.sum() if mask.full_kv_num_blocks is not None else 0)
    return float(computed) / (rows * q_tiles * q_tiles)
