"""Micro-batch planning over utterance lengths (positions), with no data attached: pure, deterministic functions.

Packed: utterances are placed into sequences of at most `pack_length` positions by best-fit decreasing, the
sequences are grouped (similar lengths together) into micro-batches of at most `frame_budget` computed
positions (rows x the longest row), and the micro-batches are shuffled. An utterance longer than
`pack_length` gets a sequence of its own. Unpacked: one utterance per row, rows of similar length batched
together up to the budget, right-padded to the longest (the layout before packing; kept for comparison).

Both return micro-batches as lists of sequences, each a list of item indices.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

MicroBatchPlan = list[list[int]]  # sequences of item indices


def best_fit_decreasing(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Bins of item indices whose lengths sum to <= capacity. `order` breaks ties between equal lengths
    (a shuffled order makes the plan vary with the seed)."""
    rank = {item: k for k, item in enumerate(order)}
    items = sorted(order, key=lambda i: (-lengths[i], rank[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin number), sorted
    for item in items:
        need = lengths[item]
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):  # fits nowhere (or longer than a bin): a new bin
            bins.append([item])
            if capacity - need > 0:
                bisect.insort(free, (capacity - need, len(bins) - 1))
            continue
        remaining, number = free.pop(k)
        bins[number].append(item)
        if remaining - need > 0:
            bisect.insort(free, (remaining - need, number))
    return bins


def group_rows(row_lengths: list[int], frame_budget: int, max_rows: int) -> list[list[int]]:
    """Consecutive runs of rows (given sorted by length) whose count x longest stays within the budget."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row, length in enumerate(row_lengths):
        if current and (max(longest, length) * (len(current) + 1) > frame_budget or len(current) >= max_rows):
            groups.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups


def plan_packed(lengths: list[int], frame_budget: int, pack_length: int, rng: random.Random) -> list[MicroBatchPlan]:
    order = list(range(len(lengths)))
    rng.shuffle(order)
    sequences = best_fit_decreasing(lengths, pack_length or frame_budget, order)
    for sequence in sequences:  # utterance order inside a sequence is irrelevant to the maths; vary it anyway
        rng.shuffle(sequence)
    totals = [sum(lengths[i] for i in s) for s in sequences]
    by_length = sorted(range(len(sequences)), key=lambda s: (totals[s], s))
    groups = group_rows([totals[s] for s in by_length], frame_budget, max_rows=len(lengths) or 1)
    batches = [[sequences[by_length[r]] for r in group] for group in groups]
    rng.shuffle(batches)
    return batches


def plan_unpacked(lengths: list[int], frame_budget: int, max_batch_size: int, bucket_size: int,
                  rng: random.Random) -> list[MicroBatchPlan]:
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[MicroBatchPlan] = []
    for start in range(0, len(order), bucket_size):
        bucket = sorted(order[start:start + bucket_size], key=lambda i: (lengths[i], i))
        for group in group_rows([lengths[i] for i in bucket], frame_budget, max_batch_size):
            batches.append([[bucket[r]] for r in group])
    rng.shuffle(batches)
    return batches


@dataclass
class BatchShape:
    """What a micro-batch computes, known on the host from the plan (no device sync needed to read it)."""
    rows: int = 0
    length: int = 0  # padded sequence length (the longest row)
    utterances: int = 0
    frames: int = 0
    real_positions: int = 0  # positions holding an utterance (the rest is padding)
    attention_pairs: int = 0  # (query, key) pairs causal attention inside each utterance/padding block needs
    sequence_lengths: tuple[int, ...] = ()  # per row

    @property
    def positions(self) -> int:
        return self.rows * self.length

    @property
    def padding(self) -> int:
        return self.positions - self.real_positions

    @property
    def talker_targets(self) -> int:  # c0 of every frame, plus eos per utterance
        return self.frames + self.utterances

    @property
    def sub_targets(self) -> int:  # codebooks 1..15 of every frame
        return 15 * self.frames


def batch_shape(sequences: list[list[int]], frames: list[list[int]]) -> BatchShape:
    """`sequences`: utterance lengths per row; `frames`: their frame counts, same nesting."""
    rows = [sum(s) for s in sequences]
    longest = max(rows, default=0)
    pairs = sum(n * (n + 1) // 2 for s in sequences for n in s)
    pairs += sum((longest - r) * (longest - r + 1) // 2 for r in rows)  # each row's padding tail is one block
    return BatchShape(rows=len(sequences), length=longest, utterances=sum(len(s) for s in sequences),
                      frames=sum(sum(f) for f in frames), real_positions=sum(rows), attention_pairs=pairs,
                      sequence_lengths=tuple(rows))


def add_shapes(shapes: list[BatchShape]) -> dict:
    """Totals over micro-batches (e.g. every rank's micro-batches of one step)."""
    keys = ("positions", "padding", "utterances", "frames", "real_positions", "talker_targets", "sub_targets")
    return {k: sum(getattr(s, k) for s in shapes) for k in keys}
