"""Chat prompts: rendering a conversation with the model's own chat template and
locating the response in it exactly.

For a conversation M and the assistant's reply r the template renders

    x    = template(M, add_generation_prompt=True)
    full = template(M + [assistant: r])

and ``full`` must start with ``x`` (else the reply cannot be located and the
item fails, naming the template). y is what follows x: with
``EndOfTurn.INCLUDED`` all of it (the reply and the template's end of turn,
e.g. ``"<|im_end|>\\n"``: what supervised fine-tuning trains on, TRL's
completion mask), with ``EXCLUDED`` only up to the end of the reply's content.

Tokenization: the template's control tokens become their special tokens,
while the same strings inside a message's content stay plain text (the rule
for all user text). To tell the two apart the conversation is rendered a
second time with a unique placeholder for each content; the rendering is
then split into template text and content, every added token of the
vocabulary found in template text is that token, and the text between two
such tokens (template text and content alike) is tokenized as one plain-text
run, as the whole rendering would be. For content free of control-token
strings the ids are therefore exactly ``tokenizer(full,
add_special_tokens=False)``, i.e. ``apply_chat_template(..., tokenize=True)``:
the tokens the model was trained on. The x/y boundary must fall between two
tokens; a token that straddles it fails the item.

Context: a rendering that opens with one of the template's control tokens
(ChatML's ``<|im_start|>``, a ``{{ bos_token }}``, Llama 3's
``<|begin_of_text|>``) is scored with that token as the context, in place of
the server's prefix token: the scored sequence is then exactly
``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, what
``generate``, vLLM's chat and TRL feed the model, with nothing before it
(``RenderedChat.opens_with_control``). A rendering that opens with plain text
keeps the prefix token, as a text prompt does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pairscore.types import CHAT_ROLES, ChatMessage, EndOfTurn
from pairscore_server.engine.tokenization import PairTokenizer

#: Placeholder for the i-th content: private-use characters no template trims or escapes.
_PLACEHOLDER = "\ue000pairscore-content-{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000pairscore-content-([0-9]+)\ue001")

#: Why a model without a chat template renders no conversation, and what to do.
_NO_TEMPLATE = (
    "the model's tokenizer ({source}) has no chat template (GetModelInfo.chat_template is "
    "false), so conversations cannot be rendered: serve a chat model, or one whose "
    "tokenizer_config.json (or chat_template.jinja) has a chat_template; or send the prompt as "
    "text (lm-eval: run without --apply_chat_template)"
)

#: Most messages in one conversation. Rendering and tokenizing a conversation is one
#: call on a prepare thread that nothing interrupts, and its cost grows with the
#: number of messages beyond their characters (a template pass and a tokenizer call
#: per message); 1,024 empty messages take ~0.1 s on a CPU (docs/reliability.md).
MAX_MESSAGES = 1024


class ChatError(ValueError):
    """A conversation that cannot be scored; the message names the cause and the fix."""


class NoChatTemplateError(ChatError):
    """The model's tokenizer has no chat template, so no conversation can be rendered."""


@runtime_checkable
class ChatRendering(Protocol):
    """An engine that renders conversations as text with its model's chat template
    (the RenderChat RPC); :meth:`ChatRenderer.render_text` says what it returns."""

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> str:
        """The conversation as text; raises ChatError (NoChatTemplateError without a template)."""
        ...

    def chat_template(self) -> str:
        """The chat template's source; raises NoChatTemplateError without one."""
        ...


@dataclass(frozen=True)
class RenderedChat:
    """A conversation and reply, rendered and tokenized.

    ``ids`` is x ⊕ y (no prefix token), the first ``prompt_tokens`` of them
    x's; ``offsets`` holds each token's code-point span in its own side's
    text (``prompt`` for x's tokens, ``response`` for y's).
    ``opens_with_control``: ``ids[0]`` is one of the template's control tokens
    (from template text, never from content) and lies in x; the engine then
    makes it the context (not scored, not counted) instead of adding its
    prefix token, so the model sees exactly ``ids``.
    """

    prompt: str
    response: str
    ids: tuple[int, ...]
    prompt_tokens: int
    offsets: tuple[tuple[int, int], ...]
    opens_with_control: bool = False


@dataclass(frozen=True)
class _Segment:
    """A stretch of the rendering: template text or a content, [start, end)."""

    start: int
    end: int
    template: bool


class ChatRenderer:
    """Renders and tokenizes conversations with ``hf_tokenizer``'s chat template."""

    def __init__(self, hf_tokenizer: Any, pair_tokenizer: PairTokenizer) -> None:
        self._hf = hf_tokenizer
        self._pair_tokenizer = pair_tokenizer
        template = getattr(hf_tokenizer, "chat_template", None)
        self.template: str | None = template if isinstance(template, str) and template else None
        source = getattr(hf_tokenizer, "name_or_path", "") or type(hf_tokenizer).__name__
        self._source = source
        #: How error messages name the template.
        self.name = f"the chat template of {source}"
        backend = hf_tokenizer.backend_tokenizer
        decoder = backend.get_added_tokens_decoder()
        #: Added tokens by their text, longest first (what the tokenizer splits out of text).
        self._added = sorted(
            ((t.content, i) for i, t in decoder.items() if t.content), key=lambda c: -len(c[0])
        )

    @property
    def available(self) -> bool:
        """Whether the tokenizer has a chat template."""
        return self.template is not None

    # -- rendering -------------------------------------------------------------------

    def _apply(
        self, messages: list[dict[str, str]], *, generation_prompt: bool, continue_final_message: bool = False
    ) -> str:
        extra = {"continue_final_message": True} if continue_final_message else {}
        try:
            text = self._hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
            )
        except Exception as exc:  # jinja's raise_exception, a template bug, ...
            raise ChatError(f"{self.name} refused the conversation: {exc}") from None
        if not isinstance(text, str):
            raise ChatError(f"{self.name} did not render text (got {type(text).__name__})")
        return text

    def source(self) -> str:
        """The chat template's Jinja source; raises NoChatTemplateError without one."""
        if self.template is None:
            raise NoChatTemplateError(_NO_TEMPLATE.format(source=self._source))
        return self.template

    def render_text(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> str:
        """The conversation as text, exactly as ``apply_chat_template(messages,
        tokenize=False, add_generation_prompt=..., continue_final_message=...)``
        renders it (lm-evaluation-harness's hf backend passes the same arguments).

        Unlike :meth:`render` the last message may be the assistant's
        (``continue_final_message`` leaves it open for the reply to go on). No
        messages render as ``""``. Raises NoChatTemplateError without a template,
        ChatError for a conversation the template or these rules refuse.
        """
        self.source()
        if add_generation_prompt and continue_final_message:
            raise ChatError(
                "add_generation_prompt and continue_final_message are both set; the first opens a "
                "new assistant turn, the second keeps the last message open: set one of them"
            )
        if not messages:
            return ""
        self._check_count_and_roles(messages, "messages")
        convo = [{"role": m.role, "content": m.content} for m in messages]
        return self._apply(
            convo, generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
        )

    @staticmethod
    def _check_count_and_roles(messages: Sequence[ChatMessage], field: str) -> None:
        """ChatError for too many messages or an unknown role; ``field`` names the messages."""
        if len(messages) > MAX_MESSAGES:
            raise ChatError(
                f"{field} has {len(messages)} messages; a conversation has at most "
                f"{MAX_MESSAGES}: keep its system message and last turns, or score it in parts"
            )
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise ChatError(f"{field}[{i}].role is {m.role!r}; a role is one of {', '.join(CHAT_ROLES)}")

    @staticmethod
    def check_messages(messages: Sequence[ChatMessage]) -> None:
        """Raise ChatError for a conversation no template should be asked to render."""
        if not messages:
            raise ChatError("prompt_messages is empty; send at least one message (e.g. the user's)")
        ChatRenderer._check_count_and_roles(messages, "prompt_messages")
        if messages[-1].role == "assistant":
            raise ChatError(
                f"the last message (prompt_messages[{len(messages) - 1}]) is from the assistant; the "
                "response is the assistant's reply to the conversation, so end it with another role "
                "and send that reply as the response"
            )

    def render(self, messages: Sequence[ChatMessage], reply: str, end_of_turn: EndOfTurn) -> RenderedChat:
        """x and y of a conversation and the assistant's reply, tokenized; raises ChatError."""
        if self.template is None:
            raise NoChatTemplateError(
                "the model's tokenizer has no chat template (GetModelInfo.chat_template is false), "
                "so prompt_messages cannot be rendered; send the prompt as text or ids"
            )
        self.check_messages(messages)
        convo = [{"role": m.role, "content": m.content} for m in messages]
        x = self._apply(convo, generation_prompt=True)
        full = self._apply([*convo, {"role": "assistant", "content": reply}], generation_prompt=False)
        if not full.startswith(x):
            raise ChatError(
                f"{self.name} renders the conversation with the generation prompt ({x[-60:]!r} at "
                f"its end) as something that is not a prefix of the conversation with the "
                "assistant's reply, so the reply cannot be located in it; this template cannot be "
                "scored with prompt_messages: render it yourself and send text"
            )
        segments, reply_end = self._segments(convo, reply, full)
        if reply_end < len(x):
            raise ChatError(f"{self.name} renders the assistant's reply inside the generation prompt")
        cut_end = len(full) if end_of_turn is EndOfTurn.INCLUDED else reply_end
        ids, spans, opens_with_control = self._tokenize(full, segments)
        prompt_tokens = 0
        kept: list[tuple[int, int]] = []
        for s, e in spans:
            if s >= cut_end:
                break  # after y (EXCLUDED: the end of turn)
            if s < cut_end < e:
                raise ChatError(
                    f"a token of {self.name}'s rendering ({full[s:e]!r}) straddles the end of the "
                    "reply's content; use end_of_turn INCLUDED"
                )
            if s < len(x) < e:
                raise ChatError(
                    f"a token of {self.name}'s rendering ({full[s:e]!r}) straddles the end of the "
                    "generation prompt, so x and y do not split between tokens"
                )
            if e <= len(x):
                if prompt_tokens != len(kept):
                    raise ChatError(f"{self.name}'s rendering puts prompt text after the response")
                prompt_tokens += 1
                kept.append((s, e))
            else:
                kept.append((s - len(x), e - len(x)))
        return RenderedChat(
            prompt=x,
            response=full[len(x) : cut_end],
            ids=tuple(ids[: len(kept)]),
            prompt_tokens=prompt_tokens,
            offsets=tuple(kept),
            opens_with_control=opens_with_control and prompt_tokens > 0,
        )

    def _segments(self, convo: list[dict[str, str]], reply: str, full: str) -> tuple[list[_Segment], int]:
        """Split ``full`` into template text and contents; also where the reply's content ends.

        The conversation is rendered again with a placeholder for each content:
        the text around the placeholders is the template's own.
        """
        contents = [m["content"] for m in convo] + [reply]
        marked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(convo)]
        marked.append({"role": "assistant", "content": _PLACEHOLDER.format(len(convo))})
        shape = self._apply(marked, generation_prompt=False)
        # one pass over the rendered shape (a scan per message was quadratic in messages)
        pieces: list[str] = []
        pos = 0
        for i, found in enumerate(_PLACEHOLDER_RE.finditer(shape)):
            index = int(found.group(1))
            if index != i:
                # a content again (the one found) or one skipped (the one expected)
                culprit = min(i, index)
                raise ChatError(
                    f"{self.name} does not render every message's content exactly once, in order "
                    f"(content {culprit}), so its control tokens cannot be told from the content"
                )
            pieces.append(shape[pos : found.start()])
            pos = found.end()
        if len(pieces) != len(contents):
            raise ChatError(
                f"{self.name} does not render every message's content exactly once, in order "
                f"(content {len(pieces)}), so its control tokens cannot be told from the content"
            )
        pieces.append(shape[pos:])
        segments: list[_Segment] = []
        pos = 0
        reply_end = -1
        for i, piece in enumerate(pieces):
            if not full.startswith(piece, pos):
                raise ChatError(
                    f"{self.name} renders its own text differently depending on the messages' "
                    "content, so its control tokens cannot be told from the content"
                )
            segments.append(_Segment(pos, pos + len(piece), True))
            pos += len(piece)
            if i == len(contents):
                break
            nxt = pieces[i + 1]
            for variant in dict.fromkeys((contents[i], contents[i].strip(), contents[i].rstrip())):
                end = pos + len(variant)
                if full.startswith(variant, pos) and full.startswith(nxt, end):
                    break
            else:
                raise ChatError(
                    f"{self.name} changes message content {i} in a way pairscore cannot follow "
                    "(only surrounding whitespace may be trimmed)"
                )
            segments.append(_Segment(pos, end, False))
            pos = end
            if i == len(contents) - 1:
                reply_end = end
        if pos != len(full):
            raise ChatError(f"{self.name} renders text pairscore cannot account for")
        return segments, reply_end

    def _tokenize(self, full: str, segments: list[_Segment]) -> tuple[list[int], list[tuple[int, int]], bool]:
        """Ids of ``full`` and each token's span in it: added tokens found in template
        text are those tokens, the runs between them plain text. Also whether the
        first token is such a control token."""
        cuts: list[tuple[int, int, int]] = []  # (start, end, id) of each control token
        for seg in segments:
            if not seg.template:
                continue
            pos = seg.start
            while pos < seg.end:
                for text, tid in self._added:
                    if full.startswith(text, pos) and pos + len(text) <= seg.end:
                        cuts.append((pos, pos + len(text), tid))
                        pos += len(text)
                        break
                else:
                    pos += 1
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for start, end, tid in [*cuts, (len(full), len(full), -1)]:
            if start > pos:
                run = full[pos:start]
                encode = (
                    self._pair_tokenizer.encode_prompts if pos == 0 else self._pair_tokenizer.encode_responses
                )
                [(run_ids, run_spans)] = encode([run])
                ids += run_ids
                spans += [(pos + s, pos + e) for s, e in run_spans]
            if tid >= 0:
                ids.append(tid)
                spans.append((start, end))
            pos = end
        return ids, spans, bool(cuts) and cuts[0][0] == 0
