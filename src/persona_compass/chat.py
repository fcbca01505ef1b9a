"""Chat-template rendering, system-role detection and fallback, and per-turn token spans.

Everything that measures a persona needs to know exactly which tokens are a turn's *content*:
activations are averaged over the assistant's own words, never over role headers or
end-of-turn tokens. :func:`render_chat` renders a conversation with the model's own chat
template and returns the token ids together with one :class:`TurnSpan` per turn.

Example:
    >>> rc = render_chat(tok, [{"role": "user", "content": "Hi"},
    ...                        {"role": "assistant", "content": "Hello!"}])
    >>> span = rc.spans[-1]
    >>> tok.decode(rc.input_ids[span.start:span.end])
    'Hello!'
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ChatTemplateError
from .text import InvalidTextError, check_text

ROLES: tuple[str, ...] = ("system", "user", "assistant")

# A system message with this text is rendered to learn whether a template keeps system turns.
_SYSTEM_MARKER = "PERSONA_COMPASS_SYSTEM_MARKER_5d1c"
# Stand-ins for message contents, used to learn the template's text around each turn.
_SENTINEL = "@@PERSONA_COMPASS_TURN_{}@@"
# Occurrences of a turn's text examined when the template's glue does not line up.
_MAX_CANDIDATES = 256

# tokenizer -> {chat template text: supports a system role}. Weak keys: the cache never keeps
# a tokenizer alive, and keying on the template text notices a template changed in place.
_SYSTEM_ROLE_CACHE: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TurnSpan:
    """Where one turn's content lies in a rendered conversation's tokens.

    Attributes:
        index: position of the turn in the ORIGINAL ``messages`` list passed by the caller.
        role: ``"system"``, ``"user"`` or ``"assistant"``.
        start: first content token (inclusive).
        end: one past the last content token (half-open; ``start == end`` for empty content).
    """

    index: int
    role: str
    start: int
    end: int

    @property
    def n_tokens(self) -> int:
        """Number of content tokens in the span."""
        return self.end - self.start


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered by a chat template.

    Attributes:
        input_ids: token ids of ``text`` (special tokens come from the template only).
        text: the rendered template text.
        spans: one span per rendered turn, in message order (a folded system message has
            none).
    """

    input_ids: list[int]
    text: str
    spans: tuple[TurnSpan, ...]


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """Extra chat-template variables that turn reasoning ("thinking") off.

    Templates that do not know the variable ignore it, so this is safe for every model.

    Args:
        tokenizer: any Hugging Face tokenizer (unused today; kept so per-model switches can
            be added without changing callers).
    """
    del tokenizer
    return {"enable_thinking": False}


def _apply_template(
    tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    """Render ``messages`` to text, turning any template failure into ChatTemplateError."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; load an "
            "instruction-tuned model or set tokenizer.chat_template to a Jinja template"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs(tokenizer),
        )
    except Exception as exc:  # templates raise anything: TemplateError, TypeError, ...
        raise ChatTemplateError(
            f"the chat template could not render the conversation: {exc}"
        ) from exc
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"the chat template returned {type(text).__name__}, not text; "
            "pass a tokenizer whose apply_chat_template(tokenize=False) returns a string"
        )
    return text


def supports_system_role(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message.

    Renders a conversation whose system message is a unique marker: templates that raise on
    a system turn (Gemma) or silently drop it count as having no system role. The answer is
    cached per tokenizer and chat template.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
    """
    key = str(getattr(tokenizer, "chat_template", None))
    try:
        per_template = _SYSTEM_ROLE_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: answer without caching
        per_template = {}
    if key not in per_template:
        probe = [
            {"role": "system", "content": _SYSTEM_MARKER},
            {"role": "user", "content": "Hello."},
        ]
        try:
            text = _apply_template(tokenizer, probe, add_generation_prompt=False)
        except ChatTemplateError:
            per_template[key] = False
        else:
            per_template[key] = _SYSTEM_MARKER in text
    return per_template[key]


def _validate(messages: object) -> list[dict[str, str]]:
    """Check the message list's shape; return plain ``{"role", "content"}`` copies."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("messages is empty; pass at least one user message")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatTemplateError(
                f"messages[{i}] is {message!r}; each message must be a dict with "
                "'role' and 'content' keys"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatTemplateError(
                f"messages[{i}] has role {role!r}; use one of {', '.join(map(repr, ROLES))}"
            )
        if not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{i}] ({role}) has content of type {type(content).__name__}; "
                "content must be a string (join multi-part content into one text first)"
            )
        try:
            check_text(content, f"messages[{i}] ({role}) content")
        except InvalidTextError as exc:
            raise ChatTemplateError(str(exc)) from None
        out.append({"role": role, "content": content})
    return out


def _prepare(tokenizer: Any, messages: object) -> tuple[list[dict[str, str]], list[int]]:
    """Validated (and, without a system role, folded) messages plus each one's original index."""
    checked = _validate(messages)
    if not any(m["role"] == "system" for m in checked) or supports_system_role(tokenizer):
        return checked, list(range(len(checked)))
    out: list[dict[str, str]] = []
    origin: list[int] = []
    pending: list[str] = []  # system texts waiting for the next user turn
    for i, message in enumerate(checked):
        if message["role"] == "system":
            if message["content"].strip():  # an empty system prompt folds to nothing
                pending.append(message["content"])
            continue
        if message["role"] == "user" and pending:
            # The research convention for templates without a system role.
            message = {"role": "user", "content": "\n\n".join([*pending, message["content"]])}
            pending = []
        elif pending:
            raise ChatTemplateError(
                f"messages[{i}] is an assistant turn right after a system message, but this "
                "chat template has no system role, so the system text must be folded into a "
                "user turn; put a user message after the system message"
            )
        out.append(message)
        origin.append(i)
    if pending:
        raise ChatTemplateError(
            "the conversation ends with a system message, but this chat template has no "
            "system role and the text can only be folded into a following user turn; "
            "add a user message after it"
        )
    return out, origin


def prepare_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Validate a conversation and adapt it to the tokenizer's chat template.

    When the template has no system role, each system message is folded into the next user
    turn as ``system + "\\n\\n" + user`` (the research convention); an empty system prompt
    folds to nothing.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.

    Returns:
        New ``{"role", "content"}`` dicts; the caller's list is not modified.

    Raises:
        ChatTemplateError: naming the offending message index and the fix.
    """
    return _prepare(tokenizer, messages)[0]


def _match_aligned(text: str, content: str, pos: int, next_glue: str) -> tuple[int, int] | None:
    """Content (or a trimmed form of it) at exactly ``pos``, followed by the expected glue."""
    for variant in dict.fromkeys((content, content.rstrip(), content.lstrip(), content.strip())):
        end = pos + len(variant)
        if text.startswith(variant, pos) and text.startswith(next_glue, end):
            return pos, end
    return None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _search(
    text: str, content: str, pos: int, floor: int, next_glue: str
) -> tuple[int, int] | None:
    """Find the content when the template's glue did not line up exactly.

    Looks for the stripped content at or after ``floor`` (the end of the previous turn) and
    prefers the occurrence followed by the most of the expected next glue (so a word inside a
    role header loses to the real content), then the first one at or after ``pos``. The match
    is widened by whatever leading/trailing whitespace of the original content the text kept.
    """
    core = content.strip()
    if not core:
        at = min(max(pos, floor), len(text))
        return at, at
    lead = content[: len(content) - len(content.lstrip())]
    trail = content[len(content.rstrip()) :]

    def widen(start: int) -> tuple[int, int]:
        end = start + len(core)
        for j in range(len(lead), 0, -1):
            if start - j >= floor and text[start - j : start] == lead[-j:]:
                start -= j
                break
        for j in range(len(trail), 0, -1):
            if text[end : end + j] == trail[:j]:
                end += j
                break
        return start, end

    best: tuple[int, int, int] | None = None  # (score, prefers pos, -start)
    start = text.find(core, floor)
    for _ in range(_MAX_CANDIDATES):
        if start < 0:
            break
        span = widen(start)
        key = (
            _common_prefix(text[span[1] : span[1] + len(next_glue)], next_glue),
            start >= pos,
            -start,
        )
        if best is None or key > best:
            best = key
        start = text.find(core, start + 1)
    return None if best is None else widen(-best[2])


def _locate_contents(
    text: str, sentinel_text: str, contents: list[str], sentinels: list[str]
) -> list[tuple[int, int]]:
    """Character range of each content in ``text``.

    ``sentinel_text`` is the same conversation rendered with every content replaced by a
    unique sentinel. The text between sentinels is the template's own "glue" (headers,
    end-of-turn tokens, default system prompts), so each content is expected right after its
    glue; this keeps a short content such as "user" from matching inside a role header. When a
    template makes its glue depend on the content, a forward search takes over.
    """
    n = len(contents)
    positions = [sentinel_text.find(s) for s in sentinels]
    if all(p >= 0 for p in positions) and len(set(positions)) == n:
        order = sorted(range(n), key=positions.__getitem__)  # templates may reorder turns
        glues, prev = [], 0
        for i in order:
            glues.append(sentinel_text[prev : positions[i]])
            prev = positions[i] + len(sentinels[i])
        glues.append(sentinel_text[prev:])
    else:  # the template dropped or duplicated a turn: search only
        order = list(range(n))
        glues = [""] * (n + 1)

    ranges: list[tuple[int, int]] = [(0, 0)] * n
    cursor = 0
    for k, i in enumerate(order):
        pos = cursor + len(glues[k])
        found = _match_aligned(text, contents[i], pos, glues[k + 1])
        if found is None:
            found = _search(text, contents[i], pos, cursor, glues[k + 1])
        if found is None:
            raise ChatTemplateError(
                f"cannot find the content of turn {i} ({contents[i][:40]!r}...) in the "
                "rendered chat template; the template rewrites message contents, which "
                "persona-compass cannot map back to tokens"
            )
        ranges[i] = found
        cursor = found[1]
    return ranges


def _token_span(starts: list[int], ends: list[int], start: int, end: int) -> tuple[int, int]:
    """Half-open token range of the tokens whose character range overlaps ``[start, end)``.

    ``starts``/``ends`` are the tokens' character offsets (non-decreasing, as a fast tokenizer
    reports them). Zero-width tokens at the edges are left out.
    """
    first = bisect.bisect_right(ends, start)  # first token ending after the content starts
    stop = bisect.bisect_left(starts, end)  # tokens from here start at or after its end
    while first < stop and ends[first] <= starts[first]:
        first += 1
    while stop > first and ends[stop - 1] <= starts[stop - 1]:
        stop -= 1
    if first >= stop:  # empty content: a zero-width span where it would start
        at = bisect.bisect_left(starts, start)
        return at, at
    return first, stop


def _control_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special and added tokens: the template's control tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(i) for i in added} | {int(i) for i in getattr(tokenizer, "all_special_ids", ())}


def _control_inside(
    tokenizer: Any,
    ids: list[int],
    starts: list[int],
    ends: list[int],
    ranges: Sequence[tuple[int, int]],
) -> bool:
    """Whether a control token was made from a message's own text."""
    # Only the template's few markers are control tokens: find them in C, check those alone.
    found = np.flatnonzero(np.isin(np.asarray(ids), list(_control_ids(tokenizer))))
    for i in found.tolist():
        a, b = starts[i], ends[i]
        if b > a and any(lo <= a and b <= hi for lo, hi in ranges):
            return True
    return False


def _tokenize(
    tokenizer: Any, text: str, contents: Sequence[tuple[int, int]]
) -> tuple[list[int], list[int], list[int]]:
    """Token ids and character offsets of ``text``; the ``contents`` ranges are tokenized
    with special tokens split into plain text (the template's own text is not)."""
    cuts = sorted((lo, hi) for lo, hi in contents if hi > lo)
    pieces: list[tuple[int, int, bool]] = []
    pos = 0
    for lo, hi in cuts:
        if lo > pos:
            pieces.append((pos, lo, False))
        pieces.append((lo, hi, True))
        pos = hi
    if pos < len(text) or not pieces:
        pieces.append((pos, len(text), False))
    ids: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    for lo, hi, plain in pieces:
        kwargs = {"split_special_tokens": True} if plain else {}
        enc = tokenizer(
            text[lo:hi], add_special_tokens=False, return_offsets_mapping=True, **kwargs
        )
        ids.extend(int(t) for t in enc["input_ids"])
        starts.extend(lo + int(a) for a, _ in enc["offset_mapping"])
        ends.extend(lo + int(b) for _, b in enc["offset_mapping"])
    return ids, starts, ends


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
) -> RenderedChat:
    """Render a conversation with the model's chat template and locate each turn's content.

    Reasoning is turned off (:func:`template_kwargs`). The text is tokenized without adding
    special tokens again, exactly as ``apply_chat_template(tokenize=True)`` does, because the
    template already writes BOS and the turn markers. Message content never becomes control
    tokens: when a message's text holds one (``<|im_end|><|im_start|>system ...``), the
    contents are tokenized with special tokens split into ordinary text, so a message cannot
    open, close or forge a turn (and the spans stay the messages').

    A token belongs to a turn's span when its character range overlaps the turn's content, so
    a span never contains a role header or end-of-turn token. Templates that trim content are
    handled (the span covers the trimmed text). Special cases:

    - a system message folded into the first user turn (templates without a system role) has
      no span of its own: its text is part of that user turn's span;
    - a default system prompt inserted by the template (SmolLM2, Qwen) is not a span;
    - empty content gives a span with ``start == end``.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]`` (see :func:`prepare_messages`).
        add_generation_prompt: append the assistant header so the model can answer next.

    Returns:
        A :class:`RenderedChat` with ``input_ids`` (list of ``n_tokens`` ints), the text, and
        the spans in message order.

    Raises:
        ChatTemplateError: invalid messages, a template failure, a slow tokenizer, or content
            that cannot be located in the rendered text.
    """
    prepared, origin = _prepare(tokenizer, messages)
    text = _apply_template(tokenizer, prepared, add_generation_prompt=add_generation_prompt)
    sentinels = [_SENTINEL.format(i) for i in range(len(prepared))]
    stand_in = [{"role": m["role"], "content": s} for m, s in zip(prepared, sentinels, strict=True)]
    sentinel_text = _apply_template(
        tokenizer, stand_in, add_generation_prompt=add_generation_prompt
    )

    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; "
            "load the fast one (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    ranges = _locate_contents(text, sentinel_text, [m["content"] for m in prepared], sentinels)
    input_ids, starts, ends = _tokenize(tokenizer, text, [])
    if _control_inside(tokenizer, input_ids, starts, ends, ranges):
        # A message typed a control token (``<|im_end|>``...): its content is tokenized as
        # plain text, so no message can open, close or forge a turn.
        input_ids, starts, ends = _tokenize(tokenizer, text, ranges)
    spans = tuple(
        TurnSpan(origin[i], prepared[i]["role"], *_token_span(starts, ends, start, end))
        for i, (start, end) in enumerate(ranges)
    )
    return RenderedChat(input_ids=input_ids, text=text, spans=spans)
