"""lm-evaluation-harness model type ``pairscore``: evaluate a model served by pairscore.

lm-eval has no plugin discovery for model types, so this module registers
``pairscore`` when imported, and its ``main`` (the ``pairscore-lm-eval``
console script, or ``python -m pairscore.lmeval``) is lm-eval's own command
line with the model registered::

    pip install 'pairscore[lm-eval]'
    pairscore-lm-eval --model pairscore --model_args target=localhost:50051 \\
        --tasks hellaswag --num_fewshot 5

In Python: ``import pairscore.lmeval`` and then
``lm_eval.simple_evaluate(model="pairscore", model_args={"target": ...})``,
or pass a :class:`PairscoreLM` instance as ``model``.

What it computes is what lm-eval's own ``hf`` backend computes on the same
model (docs/ecosystem.md has the measured agreement):

* ``loglikelihood`` returns ``(log P(continuation | context), is_greedy)``.
  The (context, continuation) pair is tokenized as lm-eval does it: trailing
  spaces of the context move to the continuation, the joint text is
  tokenized and split at the context's own token count, and the first
  context token is given, not scored (pairscore's ``PrefixMode.NONE``); an
  empty context is replaced by lm-eval's prefix token. Tokens come from the
  server's ``Tokenize`` RPC (transformers' ``tokenizer(text,
  add_special_tokens=False)``), plus the BOS token where the tokenizer adds
  one itself, as lm-eval's ``tok_encode`` does; pairs go out as token ids,
  so the server scores exactly lm-eval's ids.
* ``loglikelihood_rolling`` splits a text's tokens into lm-eval's disjoint
  rolling windows (the first conditioned on the prefix token) and sums
  their log-likelihoods.
* ``apply_chat_template`` (lm-eval's ``--apply_chat_template``, with
  ``--system_instruction`` and ``--fewshot_as_multiturn``) renders each
  prompt's conversation on the server (the ``RenderChat`` RPC) with the
  model's own chat template and the arguments the hf backend passes
  (``add_generation_prompt``, ``continue_final_message`` when lm-eval
  prefills the assistant's turn), and retries without system messages
  where the template refuses them, as the hf backend does. The rendered
  context is then tokenized as above, so the template's control tokens
  (``<|im_start|>``...) become their special tokens, as in the hf backend.
* ``generate_until`` is not supported (pairscore scores, it does not generate).

Requests go out as token-id pairs over several concurrent ScoreStream calls,
grouped by context, so that the server batches them and computes a shared
context once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pairscore.types import ItemError, Pair, PrefixMode, PrefixPolicy, ScoreOutcome

__all__ = ["PairscoreLM", "LmevalTokens", "main", "rolling_windows"]

#: Pairs per ScoreStream message.
DEFAULT_PAIRS_PER_MESSAGE = 64
#: Concurrent ScoreStream calls.
DEFAULT_STREAMS = 4

Ids = list[int]

log = logging.getLogger(__name__)


class LmevalTokens:
    """lm-eval's tokenization of requests, on top of a batched ``encode``.

    ``encode(texts)`` must return transformers' ``tokenizer(text,
    add_special_tokens=False)["input_ids"]`` for each text (the server's
    ``Tokenize`` RPC with ``parse_special_tokens=True``). ``bos_id``: the BOS
    token the tokenizer adds by itself (None: it adds none); lm-eval's
    ``tok_encode`` then starts every text with it, unless the text already
    starts with ``prefix_text``. ``prefix_id``: the token an empty context
    and the first rolling window are conditioned on.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], list[Ids]],
        *,
        prefix_id: int,
        prefix_text: str,
        bos_id: int | None = None,
    ) -> None:
        self._encode = encode
        self.prefix_id = prefix_id
        self.prefix_text = prefix_text
        self.bos_id = bos_id

    def _encode_all(self, texts: Iterable[str]) -> dict[str, Ids]:
        unique = list(dict.fromkeys(texts))
        return dict(zip(unique, self._encode(unique), strict=True)) if unique else {}

    def _with_bos(self, text: str, ids: Ids) -> Ids:
        if self.bos_id is None or (self.prefix_text and text.startswith(self.prefix_text)):
            return list(ids)
        return [self.bos_id, *ids]

    def pairs(self, requests: Sequence[tuple[str, str]]) -> list[tuple[Ids, Ids]]:
        """(context ids, continuation ids) of each (context, continuation), as lm-eval's
        ``TemplateLM.loglikelihood`` builds them."""
        texts: list[str] = []
        split: list[tuple[str, str]] = []
        for context, continuation in requests:
            if context == "":
                texts.append(continuation)
                split.append(("", continuation))
                continue
            # Trailing spaces of the context belong to the continuation's first word.
            kept = context.rstrip()
            moved = context[len(kept) :]
            split.append((kept, moved + continuation))
            texts += [kept, kept + moved + continuation]
        ids = self._encode_all(texts)
        out: list[tuple[Ids, Ids]] = []
        for context, continuation in split:
            if context == "":
                cont = list(ids[continuation])  # no BOS: lm-eval encodes it without special tokens
                if cont and cont[0] == self.prefix_id:
                    out.append((cont[:1], cont[1:]))
                else:
                    out.append(([self.prefix_id], cont))
                continue
            ctx = self._with_bos(context, ids[context])
            whole = self._with_bos(context + continuation, ids[context + continuation])
            out.append((ctx, whole[len(ctx) :]))
        return out

    def texts(self, strings: Sequence[str]) -> list[Ids]:
        """Each string's ids as lm-eval's ``tok_encode`` gives them (for rolling windows)."""
        ids = self._encode_all(strings)
        return [self._with_bos(s, ids[s]) for s in strings]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[Ids, Ids]]:
    """Disjoint (context, predicted) windows that predict every token of ``tokens`` once.

    Each window is at most ``max_length + 1`` tokens (``max_length`` model
    inputs): the first predicts up to ``max_length`` tokens after
    ``prefix_id``; each later one predicts up to ``max_length`` further tokens
    after the tokens before them, so that its context fills the window. The
    same windows as lm-eval's ``get_rolling_token_windows(..., context_len=1)``
    passed through ``make_disjoint_window``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    windows: list[tuple[Ids, Ids]] = []
    start = 0
    while start < len(tokens):
        n = min(max_length, len(tokens) - start)
        context = [prefix_id] if start == 0 else tokens[start + n - max_length - 1 : start]
        windows.append((context, tokens[start : start + n]))
        start += n
    return windows


class PairscoreLM(LM):
    """An lm-eval model that scores through a pairscore server.

    ``target``: the server's address (as :class:`~pairscore.client.ScoringClient`
    takes it). ``prefix_token``: the token an empty context and the first
    rolling window are conditioned on; default the server's prefix token
    (``ModelInfo.prefix_token``). lm-eval's ``hf`` backend uses the
    tokenizer's BOS token, else its EOS: give that token's text where it
    differs (SmolLM2-Instruct: ``prefix_token=<|im_start|>``).
    ``add_bos_token``: whether lm-eval's tokenization starts each text with
    the BOS token; default: when the tokenizer adds one itself (the server's
    prefix policy is ``bos``). ``max_length``: model inputs per request,
    lm-eval's ``max_length``; default the server's context, less the one
    position the server keeps for the last token. Longer requests keep their
    last ``max_length + 1`` tokens, as lm-eval does. ``pairs_per_message`` and
    ``streams``: how requests go out (lm-eval's ``batch_size`` does not
    apply: the server batches). ``token``, ``tls``, ``timeout``: as the client
    takes them.
    """

    def __init__(
        self,
        target: str,
        *,
        prefix_token: str | None = None,
        add_bos_token: bool | None = None,
        max_length: int | None = None,
        pairs_per_message: int = DEFAULT_PAIRS_PER_MESSAGE,
        streams: int = DEFAULT_STREAMS,
        token: str | None = None,
        tls: bool = False,
        timeout: float = 600.0,
        **ignored: Any,  # lm-eval's batch_size, max_batch_size, device: the server decides
    ) -> None:
        super().__init__()
        from pairscore.client import ScoringClient

        self.client = ScoringClient(
            str(target),
            token=None if token is None else str(token),  # lm-eval parses a numeric value as int
            tls=bool(tls) or None,
            timeout=float(timeout),
            wait_for_ready=True,
        )
        self.info = self.client.model_info()
        self._pairs_per_message = int(pairs_per_message)
        self._streams = int(streams)
        if self._pairs_per_message < 1 or self._streams < 1:
            raise ValueError(
                f"pairs_per_message and streams must be >= 1, got {pairs_per_message} and {streams}"
            )
        prefix_text = prefix_token or self.info.prefix_token
        if prefix_token is None:
            prefix_id = self.info.prefix_token_id
        else:
            [prefix_ids] = self.client.tokenize([prefix_token], parse_special_tokens=True)
            if len(prefix_ids) != 1:
                raise ValueError(
                    f"prefix_token={prefix_token!r} is {len(prefix_ids)} tokens for this server's "
                    "tokenizer; give the exact text of one token, e.g. <|endoftext|> or <s>"
                )
            prefix_id = prefix_ids[0]
        adds_bos = self.info.prefix_policy is PrefixPolicy.BOS
        if add_bos_token is None:
            add_bos_token = adds_bos
        elif isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        if add_bos_token and not adds_bos:
            raise ValueError(
                "add_bos_token=True: this server's tokenizer adds no BOS token by itself "
                f"(prefix policy {self.info.prefix_policy.value}), so its BOS id is unknown here"
            )
        self.tokens = LmevalTokens(
            self._encode,
            prefix_id=prefix_id,
            prefix_text=prefix_text,
            bos_id=self.info.prefix_token_id if add_bos_token else None,
        )
        limit = self.info.max_context_tokens
        if self.info.max_item_tokens:
            limit = min(limit, self.info.max_item_tokens)
        self._max_length = int(max_length) if max_length else limit - 1

    @property
    def max_length(self) -> int:
        """Model inputs per request; a request holds at most ``max_length + 1`` tokens."""
        return self._max_length

    # --- lm-eval's interface ------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per request, as lm-eval's hf backend."""
        pairs = self.tokens.pairs([tuple(r.args) for r in requests])
        outcomes = self._score([self._fit(ctx, cont) for ctx, cont in pairs], disable_tqdm)
        results = []
        for request, score in zip(requests, outcomes, strict=True):
            results.append((score.conditional_logprob, bool(score.response_is_greedy)))
            self.cache_hook.add_partial("loglikelihood", request.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, summed over lm-eval's rolling windows."""
        texts = [r.args[0] for r in requests]
        owners: list[int] = []
        windows: list[tuple[Ids, Ids]] = []
        for i, ids in enumerate(self.tokens.texts(texts)):
            for window in rolling_windows(ids, self.tokens.prefix_id, self.max_length):
                owners.append(i)
                windows.append(window)
        totals = [0.0] * len(texts)
        for owner, score in zip(owners, self._score(windows, disable_tqdm), strict=True):
            totals[owner] += score.conditional_logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "pairscore scores text and does not generate: run generation tasks with a "
            "generating backend (hf, vllm, local-completions); loglikelihood and "
            "multiple-choice tasks work here"
        )

    # --- chat templates (--apply_chat_template) ---------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval's request cache is keyed by: the served model's source and revision."""
        source = (
            f"{self.info.model_source}@{self.info.revision}" if self.info.revision else self.info.model_source
        )
        return "pairscore__" + source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The source of the served model's chat template, which lm-eval records with the
        results (None when ``chat_template`` is false). The server renders with its model's
        one template: a template name (``--apply_chat_template NAME``) cannot pick another."""
        if chat_template is False or chat_template is None:
            return None
        if isinstance(chat_template, str):
            log.warning(
                "chat template %r requested by name; the pairscore server renders with its "
                "model's own chat template",
                chat_template,
            )
        return self.client.chat_template()

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as text, rendered by the server with the model's chat template
        as lm-eval's hf backend renders it (``continue_final_message`` when not
        ``add_generation_prompt``: lm-eval then prefills the assistant's turn). A template
        that refuses the conversation is asked again without its system messages, as the hf
        backend does; a model without a chat template fails with the cause and the fix."""
        from pairscore.errors import InvalidArgumentError

        def render(messages: list[dict[str, str]]) -> str:
            return self.client.render_chat(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

        try:
            return render(chat_history)
        except InvalidArgumentError as exc:
            if "refused the conversation" not in str(exc) or all(m["role"] != "system" for m in chat_history):
                raise
            log.warning("the chat template refused the conversation (%s); removing its system messages", exc)
            return render([m for m in chat_history if m["role"] != "system"])

    # --- helpers ---------------------------------------------------------------------------

    def _fit(self, context: Ids, continuation: Ids) -> tuple[Ids, Ids]:
        """Keep the last ``max_length + 1`` tokens, as lm-eval does; the continuation whole."""
        room = self.max_length + 1 - len(continuation)
        if room < 1:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens leaves no context within "
                f"max_length={self.max_length}; shorten it or raise max_length"
            )
        return context[-room:], continuation

    def _encode(self, texts: list[str]) -> list[Ids]:
        """Batched Tokenize calls within the server's per-request limit."""
        step = self.info.max_pairs_per_request or 256
        out: list[Ids] = []
        for i in range(0, len(texts), step):
            out += [list(ids) for ids in self.client.tokenize(texts[i : i + step], parse_special_tokens=True)]
        return out

    def _score(self, pairs: Sequence[tuple[Ids, Ids]], disable_tqdm: bool) -> list[Any]:
        """PairScores of token-id pairs (context given, not scored), in order; raises on an item error.

        Pairs go out grouped by context, so that a shared context lands in one
        server batch and is computed once.
        """
        order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], i))
        items = (
            Pair(prompt_ids=tuple(pairs[i][0]), response_ids=tuple(pairs[i][1]), id=str(i)) for i in order
        )
        results: list[Any] = [None] * len(pairs)
        outcomes: Iterable[ScoreOutcome] = self._stream(items)
        if not disable_tqdm:
            from tqdm import tqdm

            outcomes = tqdm(outcomes, total=len(pairs), desc="pairscore requests")
        for i, outcome in zip(order, outcomes, strict=True):
            if isinstance(outcome, ItemError):
                raise RuntimeError(
                    f"pairscore could not score request {i} ({len(pairs[i][0])} context + "
                    f"{len(pairs[i][1])} continuation tokens): {outcome.code.value}: {outcome.message}"
                )
            results[i] = outcome
        return results

    def _stream(self, pairs: Iterable[Pair]) -> Iterator[ScoreOutcome]:
        """The pairs through ``score_iter`` (concurrent streams, order kept, reconnects),
        the first context token given, with ``response_is_greedy``."""
        return self.client.score_iter(
            pairs,
            batch_size=self._pairs_per_message,
            streams=self._streams,
            greedy=True,
            prefix=PrefixMode.NONE,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """``pairscore-lm-eval``: lm-eval's command line, with the ``pairscore`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # ``python -m pairscore.lmeval``: register the importable module's class, not this copy's.
    from pairscore.lmeval import main as _main

    _main()
else:
    # lm-eval fills its model registry with its own backends (hf, vllm, ...) only when it
    # finds the registry empty; load them first, or registering pairscore would hide them
    # (``pairscore-lm-eval --model hf`` would find no such model).
    import lm_eval.models  # noqa: F401

    register_model("pairscore")(PairscoreLM)
