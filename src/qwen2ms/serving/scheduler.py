"""Continuous-batching scheduler: FCFS admission under block and batch limits, preemption by recompute."""
from __future__ import annotations

import enum
from collections import deque
from typing import Any, Deque, List, Optional, Tuple

from .block_manager import BlockManager

__all__ = ["Sequence", "SequenceStatus", "Scheduler"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion being generated: its prompt, the tokens generated so far and where it stands.

    Args:
        seq_id: unique in the engine (``"<request id>#<index>"``).
        order: ``(arrival number, index)``; smaller arrived earlier (FCFS and preemption use it).
        prompt_ids: the prompt's token ids.
        max_new_tokens: the generation budget.
        request: the owning request (opaque to the scheduler).
    """

    def __init__(self, seq_id: str, order: Tuple[int, int], prompt_ids: List[int], max_new_tokens: int,
                 request: Any = None):
        self.seq_id = seq_id
        self.order = order
        self.prompt_ids = prompt_ids
        self.output_ids: List[int] = []
        self.max_new_tokens = int(max_new_tokens)
        self.request = request
        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.stop_reason: Any = None
        self.num_computed = 0  # leading tokens whose KV is in the sequence's blocks

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> List[int]:
        """Prompt then generated ids (a new list)."""
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.value}, prompt={len(self.prompt_ids)}, "
                f"generated={len(self.output_ids)})")


class Scheduler:
    """Decides which sequences prefill and decode each step; owns the waiting queue and the running batch.

    A step is two phases driven by the engine: :meth:`admit` takes waiting sequences first come first served
    while ``max_num_seqs`` and the block pool allow (the engine prefills each and samples its first token),
    then :meth:`prepare_decode` makes sure every running sequence has a slot for its newest token, preempting
    the latest-arrived running sequence (its blocks are freed, it goes back to the front of the queue, and
    later recomputes prompt and generated tokens in one prefill) whenever the pool is out of blocks.
    Admission stops at the first sequence that does not fit (no overtaking), and it keeps enough blocks free
    for the running sequences' next decode step so that admission does not cause preemption right away.

    Args:
        block_manager: the pool.
        max_num_seqs: most sequences in the running batch.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int):
        self.blocks = block_manager
        self.max_num_seqs = int(max_num_seqs)
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def _decode_reserve(self, extra: List[Sequence]) -> int:
        """Blocks the running sequences (and ``extra``, after their first token) need for the next decode.

        A running sequence admitted in this step already owns blocks for all its tokens; after its first
        sampled token it may need one more, which ``extra`` accounts for before admission and its table
        length after (so that sequence never counts twice).
        """
        bm = self.blocks
        need = sum(max(0, bm.blocks_for(s.num_tokens) - bm.num_blocks_of(s.seq_id)) for s in self.running)
        return need + sum(bm.blocks_for(s.num_tokens + 1) - bm.blocks_for(s.num_tokens) for s in extra)

    def admit_next(self) -> Optional[Tuple[Sequence, int]]:
        """Move the first waiting sequence to running if it fits; return ``(sequence, cached tokens)`` or None.

        The sequence gets blocks for all its tokens (prompt and any generated before a preemption); the
        first ``cached tokens`` are prefix-cache hits whose KV is already in its blocks, the rest the engine
        prefills before admitting the next one (whose prefix hits may then include them). None when the queue
        is empty, the batch is full, or the head does not fit with the blocks that the running sequences
        (the head included) need for their next decode step.
        """
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return None
        seq = self.waiting[0]
        if not self.blocks.can_allocate(seq.token_ids, reserve=self._decode_reserve([seq])):
            return None
        self.waiting.popleft()
        cached = self.blocks.allocate(seq.seq_id, seq.token_ids)
        seq.num_computed = cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.running.sort(key=lambda s: s.order)  # a preempted sequence returns to its place
        return seq, cached

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it at the front of the queue (its tokens are kept)."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def prepare_decode(self) -> List[Sequence]:
        """Give each running sequence a slot for its newest token, preempting as needed; return the batch.

        The newest token (sampled, not yet fed to the model) goes to position ``num_tokens - 1``. Sequences
        are served in arrival order, and the victim is always the latest-arrived one still running, so the
        oldest requests keep making progress (possibly the sequence asking is itself the victim).
        """
        batch: List[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below by an earlier sequence of this loop
            while not self.blocks.append_slots(seq.seq_id, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                batch.append(seq)
        return batch

    def finish(self, seq: Sequence, reason: Optional[str], stop_reason: Any = None) -> None:
        """End a sequence (running or waiting): free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
