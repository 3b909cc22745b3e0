"""The sizes of the engine's work units (:class:`EngineLimits`), torch-free.

:func:`~pairscore_server.engine.loading.engine_limits` picks them by device
from a :class:`~pairscore_server.engine.spec.ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pairscore_server.engine.tries import MIN_SHARED_TOKENS

#: Default memory for one chunk of float32 logits on CPU. The chunk is written
#: by the output GEMM and read back by the log-softmax, so it should stay in
#: the last-level cache: measured on a 32 MiB-L3 EPYC (vocabulary 49152), the
#: head runs 12-25 % faster with 24 MiB chunks than with 64 MiB ones, and
#: falls off above 30 MiB.
DEFAULT_CHUNK_BYTES = 24 * 2**20

#: On CUDA a chunk is a few kernel launches; bigger chunks launch fewer.
CUDA_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class EngineLimits:
    """Sizes of the engine's work units.

    ``max_batch_tokens`` bounds the tokens of one forward pass: the length of
    a packed row, or rows x longest row of a padded batch; a single pair
    longer than the budget still runs alone.
    ``packing``: run packed rows (several pairs end to end, shared prompts
    inside the row, attention per segment: see packing.py) instead of padded
    batches and a key/value cache per shared prompt. Used when the model
    supports it (SDPA attention that passes attention kwargs through, checked
    on a probe); otherwise the engine falls back to padded batches.
    ``min_batch_efficiency`` keeps real tokens / padded tokens of a batch at
    least this high (padding buys nothing on CPU, a lot on GPU).
    ``call_batches``: one ``score`` call may hold this many forward passes'
    worth of tokens, so the engine has pairs to group by length and shared
    prompts to find (a server's batcher sizes its calls by it, counting the
    positions computed: a run shared by several pairs counts once).
    ``chunk_bytes`` bounds the float32 logits held at once by the log-prob head.
    ``share_prompts``: pairs of one ``score`` call with the same prompt run
    the prompt once and reuse its key/value cache for every response.
    ``share_prefixes``: beyond whole prompts, sequences of one call that begin
    with the same run of at least ``min_shared_tokens`` token ids (few-shot
    exemplars, a system prompt) run it once: a trie over token ids
    (packing.py), in both layouts.
    """

    max_batch_tokens: int = 8192
    call_batches: int = 4
    min_batch_efficiency: float = 0.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    share_prompts: bool = True
    packing: bool = True
    share_prefixes: bool = True
    min_shared_tokens: int = MIN_SHARED_TOKENS
