"""Judges that score how fully a rollout stays in its role, on the research's 0-3 scale.

* 0 - refuses the role and stays the AI;
* 1 - stays the AI and answers without the role;
* 2 - says it is the AI but shows the role's traits;
* 3 - fully in role.

Only score-3 rollouts form a role vector (REFERENCE.md, "The extraction pipeline", step 5).
Four judges share one small protocol, :class:`Judge`:

=====================  ==========================================================  ==========
spec                   what scores                                                  cost
=====================  ==========================================================  ==========
``none``               nobody: every rollout counts as 3 (:class:`NoJudge`)         free
``heuristic``          regexes for refusals and AI self-talk (:class:`HeuristicJudge`) free
``model:SPEC``         a local chat model's next-token digit (:class:`ModelJudge`)  one forward
``openai:URL[#model]`` an OpenAI-compatible server, like the research               API calls
=====================  ==========================================================  ==========

:func:`make_judge` builds one from its spec. :func:`heuristic_agreement` measures the
heuristic against a hand-labelled sample shipped in ``data/judge_sample.jsonl``.

Example::

    judge = make_judge("heuristic")
    judge.score([JudgeItem("pirate", rubric, "Who are you?", "Arr, Captain Reyes o' the...")])
    # [3]
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..backends.openai_client import ClientOptions, OpenAIClient
from ..backends.spec import accepted_forms, parse_backend_spec
from ..chat import render_chat
from ..errors import PersonaCompassError
from ..generation import left_pad
from ..jsonio import parse_json
from ..record import padded_position_ids

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

SCORES: tuple[int, ...] = (0, 1, 2, 3)
IN_ROLE = 3
"""The score a rollout needs to count toward its role vector."""

DEFAULT_OPENAI_JUDGE_MODEL = "gpt-4.1-mini"
SAMPLE_FILE = "judge_sample.jsonl"
GENERIC_RUBRIC = (
    "Score 3 if the answer speaks fully as the {role}, with its voice, views and life and no "
    "mention of being an AI; 2 if it says it is an AI but still shows the {role}'s traits; 1 "
    "if it answers as a plain AI assistant; 0 if it refuses the role or insists it is only an AI."
)
"""Rubric used for a role that has none (e.g. sample items whose role is not in the catalogue)."""

JUDGE_KINDS = ("none", "heuristic", "model", "openai")
"""The backend kinds a judge spec takes (:func:`~persona_compass.backends.parse_backend_spec`)."""
SPEC_FORMS = accepted_forms(JUDGE_KINDS, default_model=DEFAULT_OPENAI_JUDGE_MODEL)

JUDGE_PROMPT = """\
You are grading one answer from a role-play exercise. A language model was asked to play \
the role below, then it was asked a question. Decide how completely its answer stays in \
that role.

Role: {role}
Guidance for this role: {rubric}

Question:
{question}

Answer:
{answer}

Use this scale:
0 = the answer refuses to play the role and stays the AI (for example: "As an AI, I can't \
pretend to be ...").
1 = the answer stays the AI and simply answers the question, with nothing of the role in it.
2 = the answer says it is an AI, or talks about itself as one, but still shows traits of the \
role (its voice, opinions, manner or concerns).
3 = the answer is fully in role: it speaks as the character throughout and never mentions \
being an AI or a language model.

Reply with a single digit: 0, 1, 2 or 3."""
"""The generic judge template; ``{role}``, ``{rubric}``, ``{question}``, ``{answer}`` are
filled by :func:`judge_prompt`."""


class JudgeError(PersonaCompassError):
    """A judge spec is unknown or malformed, or a judge cannot be built or run."""


@dataclass(frozen=True)
class JudgeItem:
    """One rollout to judge.

    Attributes:
        role: the role's name (``"pirate"``).
        rubric: the role's judge guidance (``Role.rubric``); may be ``""``.
        question: the user's question.
        answer: the model's reply.
    """

    role: str
    rubric: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        for name in ("role", "rubric", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise JudgeError(
                    f"JudgeItem.{name} is {type(value).__name__} ({value!r:.60}); "
                    "it must be a string"
                )


def judge_prompt(item: JudgeItem) -> str:
    """The judge's user message for one item.

    A rubric that is itself a whole judge prompt (the research release's ``eval_prompt``,
    recognised by a ``{question}`` or ``{answer}`` placeholder) is used as it is, with those
    placeholders filled; any other rubric is wrapped in :data:`JUDGE_PROMPT`.
    """
    if "{answer}" in item.rubric or "{question}" in item.rubric:
        return (
            item.rubric.replace("{role}", item.role)
            .replace("{question}", item.question)
            .replace("{answer}", item.answer)
        )
    rubric = item.rubric.strip() or GENERIC_RUBRIC.format(role=item.role)
    return JUDGE_PROMPT.format(
        role=item.role, rubric=rubric, question=item.question, answer=item.answer
    )


_FIRST_INT = re.compile(r"-?\d+")


def parse_score(reply: str) -> int | None:
    """The first integer in a judge's reply when it is 0-3, else ``None``.

    The research read the first integer of the reply; "Score: 2" gives 2, "3" gives 3,
    "5/10" and "no idea" give ``None``.
    """
    match = _FIRST_INT.search(reply or "")
    if match is None:
        return None
    value = int(match.group())
    return value if value in SCORES else None


@runtime_checkable
class Judge(Protocol):
    """Scores role adherence: one ``0..3`` (or ``None`` when unreadable) per item."""

    name: str

    def score(self, items: Sequence[JudgeItem]) -> list[int | None]: ...


# --------------------------------------------------------------------------- local judges


class NoJudge:
    """Scores every rollout 3: no filtering at all (fast, for smoke runs and the default
    condition)."""

    name = "none"

    def score(self, items: Sequence[JudgeItem]) -> list[int | None]:
        return [IN_ROLE for _ in items]


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_I_AM = r"\bi(?:\s+am|'m)"
_CANNOT = (
    r"\bi(?:\s+(?:can't|cannot|can\s+not|won't|will\s+not|must\s+decline\s+to|"
    r"have\s+to\s+decline\s+to|would\s+rather\s+not|prefer\s+not\s+to|"
    r"(?:don't|do\s+not)\s+feel\s+comfortable)|'d\s+rather\s+not|"
    r"(?:\s+am|'m)\s+(?:not\s+able\s+to|unable\s+to|not\s+comfortable|not\s+going\s+to))"
)
_ROLE_PLAY = (
    r"(?:pretend(?:ing)?\s+to\s+(?:be|have)|pretend(?:ing)?\s+that\s+i|role-?play|"
    r"play(?:ing)?\s+(?:the\s+|this\s+|that\s+|a\s+|an\s+)?(?:role|part|character)|"
    r"act(?:ing)?\s+as|tak(?:e|ing)\s+on|adopt(?:ing)?|assum(?:e|ing)\s+(?:the|a|an)\s+"
    r"(?:role|persona|identity|character)|embody(?:ing)?|impersonat\w+|portray\w*|"
    r"be\s+(?:a|an)\s+|become\s+(?:a|an)\s+|stay\s+in\s+character|"
    r"speak(?:ing)?\s+as\s+(?:a|an|the|if))"
)
REFUSAL_PATTERNS: tuple[str, ...] = (
    # "I can't pretend to be a pirate", "I'm not able to role-play", "I won't act as ..."
    _CANNOT + r"\s+(?:\w+\s+){0,2}?" + _ROLE_PLAY,
    # "I must decline this role-play", "I'll have to refuse the role"
    r"\b(?:decline|refuse)\b[^.!?\n]{0,40}\b(?:role|character|persona|pretend)",
    # "that's not something I can pretend about"
    r"\bnot\s+something\s+i\s+(?:can|will)\s+(?:pretend|role-?play)",
)
"""Role refusals (score 0), matched case-insensitively after curly apostrophes become
``'``: "I can't / cannot / won't / am unable to / am not going to / would rather not / don't
feel comfortable ..." followed within two words by "pretend to be/have", "role-play", "play the
role/part/character", "act as", "take on", "adopt", "assume the role/persona", "embody",
"impersonate", "portray", "be a(n)", "become a(n)", "stay in character" or "speak as";
"decline/refuse ... role/character/persona/pretend" within one sentence."""

_HEDGE = r"(?:(?:just|only|simply|merely|actually|really|still|basically)\s+)?"
_QUALITY = (
    r"(?:(?:helpful|friendly|virtual|digital|advanced|large|conversational|text-based|"
    r"ai-powered|artificial)\s+)?"
)
# "as" needs an article ("as an AI"), so "tools such as AI art" does not count.
_AS_A = r"\bas\s+" + _HEDGE + r"an?\s+" + _QUALITY
_I_AM_A = _I_AM + r"\s+" + _HEDGE + r"(?:an?\s+)?" + _QUALITY
_AI_NOUN = (
    r"(?:ai|a\.i\.|artificial\s+intelligence|(?:large\s+)?language\s+model|llm|chatbot|"
    r"chat\s+bot|(?:ai|virtual|digital)\s+assistant|machine\s+learning\s+model|"
    r"computer\s+program|ai\s+model)\b"
)
# A bare "assistant", unless it is someone's assistant ("assistant to the CEO") or a job
# title ("assistant manager").
_ASSISTANT = (
    r"assistant\b(?!\s+(?:to|manager|coach|editor|director|professor|principal|chef|"
    r"producer|teacher|at|for|in)\b)"
)


def _ai_patterns(noun: str) -> tuple[str, ...]:
    return (
        # "As an AI ...", "as a language model", "as an assistant"
        _AS_A + noun,
        # "I'm an AI", "I am just a language model", "I'm only a chatbot", "I'm an assistant"
        _I_AM_A + noun,
        # any mention of a language model
        r"\blanguage\s+model\b",
        # "I don't have personal experiences/opinions", "feelings or emotions", consciousness
        r"\bi\s+(?:don't|do\s+not|dont)\s+(?:actually\s+|really\s+|truly\s+)?have\s+"
        r"(?:any\s+|real\s+)?(?:personal\s+(?:experiences?|opinions|feelings|preferences|"
        r"memories|beliefs|life)|(?:feelings|emotions)\s+(?:or|and)\s+|"
        r"(?:feelings|emotions)\s+(?:in\s+)?(?:the\s+(?:same\s+)?way|like)\s+"
        r"(?:humans|people|a\s+person)|consciousness|subjective\s+experiences?|"
        r"human\s+experiences?|lived\s+experiences?)",
        # "I'm not a real person", "I'm not capable of feelings"
        _I_AM + r"\s+not\s+(?:a\s+)?(?:real|actual)\s+(?:person|human)",
        _I_AM + r"\s+not\s+capable\s+of\s+(?:feeling|emotions|experiencing)",
        # who made me / what I was trained on
        r"\b(?:trained|created|developed|built|made)\s+by\s+(?:openai|anthropic|google|"
        r"meta|hugging\s*face|alibaba|mistral|deepseek)\b",
        r"\btraining\s+data\b",
        r"\bknowledge\s+cut-?off\b",
        # "I'm ChatGPT", "I am Claude", "I'm Qwen"
        _I_AM + r"\s+(?:chatgpt|claude|gemini|qwen|llama|smollm\w*|gpt-?\d)",
        r"\bhelpful\s+(?:ai\s+)?assistant\b",
    )


AI_PATTERNS: tuple[str, ...] = _ai_patterns(r"(?:" + _AI_NOUN + "|" + _ASSISTANT + ")")
"""AI self-identification (score 1), case-insensitive: "as (just) a(n) AI / language model /
chatbot / AI or virtual assistant / assistant", "I'm (just/only) a(n) (helpful/virtual/...)
AI / chatbot / assistant / language model" (a bare "assistant" not followed by "to",
"manager", "at", ... and not counted for roles whose name contains "assistant"), any
"language model", "I don't have personal experiences / opinions / feelings or emotions /
feelings the way humans do / consciousness / lived experiences", "I'm not a real person",
"I'm not capable of feeling", "trained/created by OpenAI/Anthropic/...", "training data",
"knowledge cutoff", "I'm ChatGPT/Claude/Qwen/...", "helpful assistant"."""

_REFUSAL_RE = [re.compile(p, re.IGNORECASE) for p in REFUSAL_PATTERNS]
_AI_RE = [re.compile(p, re.IGNORECASE) for p in AI_PATTERNS]
# For roles that are themselves assistants (executive_assistant), "I'm an assistant" is in role.
_AI_RE_NO_BARE = [re.compile(p, re.IGNORECASE) for p in _ai_patterns(_AI_NOUN)]


class HeuristicJudge:
    """A local, deterministic judge from regexes: refusal -> 0, AI self-identification -> 1,
    anything else -> 3.

    It never gives 2 (it cannot tell role flavour from plain prose), and it scores a plain
    assistant answer that never names itself as 3. Its point is the binary decision that
    extraction uses, "score 3 or not"; :func:`heuristic_agreement` measures it. The patterns
    are :data:`REFUSAL_PATTERNS` and :data:`AI_PATTERNS`.
    """

    name = "heuristic"

    def score_text(self, answer: str, role: str = "") -> int:
        """Score one answer given to ``role``."""
        text = answer.translate(_APOSTROPHES)
        if any(r.search(text) for r in _REFUSAL_RE):
            return 0
        ai_res = _AI_RE_NO_BARE if "assistant" in role.lower() else _AI_RE
        if any(r.search(text) for r in ai_res):
            return 1
        return IN_ROLE

    def score(self, items: Sequence[JudgeItem]) -> list[int | None]:
        return [self.score_text(item.answer, item.role) for item in items]


def _digit_token_ids(tokenizer: Any) -> list[list[int]]:
    """For each of "0".."3", every single token that decodes to that digit (bare, or with a
    leading space / word-start marker)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    out: list[list[int]] = []
    for digit in map(str, SCORES):
        candidates: set[int] = set()
        for variant in (digit, " " + digit):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids:
                candidates.add(int(ids[-1]))
        for key in (digit, "\u0120" + digit, "\u2581" + digit, " " + digit):
            if key in vocab:
                candidates.add(int(vocab[key]))
        found = sorted(
            t
            for t in candidates
            if tokenizer.decode([t], skip_special_tokens=False).strip() == digit
        )
        if not found:
            raise JudgeError(
                f"the judge tokenizer ({type(tokenizer).__name__}) has no token for the digit "
                f"{digit!r}; use a judge model whose tokenizer writes digits as tokens"
            )
        out.append(found)
    flat = [t for ids in out for t in ids]
    if len(flat) != len(set(flat)):
        raise JudgeError("the judge tokenizer maps two different digits to the same token")
    return out


class ModelJudge:
    """A local chat model as the judge: it reads :func:`judge_prompt` as a user turn and the
    score is the digit among "0".."3" it finds most likely as its next token.

    Each digit's probability sums its token variants (``"3"``, ``" 3"``, ...), so the answer
    never depends on whether the model would write a space first. Prompts are scored in
    left-padded batches, longest first, with explicit ``position_ids``. Only forward passes
    are run; the model is not changed (but hooks already on it, such as capping, do apply).

    Args:
        spec_or_model: a model spec for :func:`persona_compass.models.load_model`, or a
            loaded causal LM.
        tokenizer: its tokenizer (required with a loaded model).
        batch_size: prompts per forward pass.
        dtype: dtype when loading from a spec.

    Example:
        >>> judge = ModelJudge("qwen3-0.6b")  # doctest: +SKIP
        >>> judge.score([item])  # doctest: +SKIP
        [3]
    """

    def __init__(
        self,
        spec_or_model: str | torch.nn.Module,
        tokenizer: Any = None,
        batch_size: int = 8,
        *,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise JudgeError(f"batch_size={batch_size!r} must be an integer >= 1")
        if isinstance(spec_or_model, str):
            from ..models import load_model

            if not spec_or_model.strip():
                raise JudgeError("the judge model spec is empty; write model:ALIAS_OR_PATH")
            self.model, self.tokenizer = load_model(spec_or_model.strip(), dtype=dtype)
            if tokenizer is not None:
                self.tokenizer = tokenizer
            label = spec_or_model.strip()
        else:
            if tokenizer is None:
                raise JudgeError(
                    "ModelJudge got a loaded model but tokenizer=None; pass its tokenizer too"
                )
            self.model, self.tokenizer = spec_or_model, tokenizer
            from ..models import model_id

            label = model_id(spec_or_model)
        self.name = f"model:{label}"
        self.batch_size = batch_size
        self.digit_ids = _digit_token_ids(self.tokenizer)
        self._keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        return 0  # masked out anyway

    @torch.inference_mode()
    def probabilities(self, items: Sequence[JudgeItem]) -> list[list[float]]:
        """For each item, the probabilities of "0".."3", renormalised over those four."""
        prompts = [
            render_chat(
                self.tokenizer,
                [{"role": "user", "content": judge_prompt(item)}],
                add_generation_prompt=True,
            ).input_ids
            for item in items
        ]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        device = next(self.model.parameters()).device
        out: list[list[float]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = left_pad([prompts[i] for i in chunk], self._pad_id(), device)
            mask = batch["attention_mask"]
            batch["position_ids"] = padded_position_ids(mask)
            extra = {"logits_to_keep": 1} if self._keep_arg else {}
            logits = self.model(**batch, use_cache=False, **extra).logits[:, -1, :]
            logprobs = logits.float().log_softmax(-1)
            per_digit = torch.stack(
                [logprobs[:, ids].logsumexp(-1) for ids in self.digit_ids], dim=-1
            )
            probs = per_digit.softmax(-1).cpu()
            for row, i in enumerate(chunk):
                out[i] = [float(p) for p in probs[row]]
        return out

    def score(self, items: Sequence[JudgeItem]) -> list[int | None]:
        """The most likely digit for each item (ties go to the lower score)."""
        result: list[int | None] = []
        for probs in self.probabilities(items):
            result.append(max(SCORES, key=lambda s: (probs[s], -s)))
        return result


class OpenAIJudge:
    """An OpenAI-compatible chat model as the judge, as in the research (gpt-4.1-mini,
    temperature 1, first integer of the reply).

    Args:
        base_url: the API root, e.g. ``"https://api.openai.com/v1"``.
        model: the judge model name.
        temperature: sampling temperature of the judge.
        max_tokens: a cap on reply length (``None``: not sent).
        **client_options: ``api_key_env``, ``concurrency``, ``retries``,
            ``requests_per_second``, ``timeout``, ``backoff``
            (:class:`~persona_compass.backends.openai_client.ClientOptions`), passed to
            :class:`~persona_compass.backends.openai_client.OpenAIClient`.

    Unreadable replies score ``None``; a request that fails for good raises
    :class:`~persona_compass.backends.openai_client.OpenAIError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str = DEFAULT_OPENAI_JUDGE_MODEL,
        temperature: float = 1.0,
        *,
        max_tokens: int | None = None,
        **client_options: Unpack[ClientOptions],
    ) -> None:
        if not temperature >= 0:
            raise JudgeError(f"temperature={temperature!r} must be >= 0")
        if max_tokens is not None and max_tokens < 1:
            raise JudgeError(f"max_tokens={max_tokens!r} must be >= 1 or None")
        self.client = OpenAIClient(base_url, model, **client_options)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.name = f"openai:{self.client.base_url}#{model}"

    def replies(self, items: Sequence[JudgeItem]) -> list[str]:
        """The judge's raw replies, in order."""
        conversations = [[{"role": "user", "content": judge_prompt(item)}] for item in items]
        return self.client.chat_many(
            conversations, temperature=self.temperature, max_tokens=self.max_tokens
        )

    def score(self, items: Sequence[JudgeItem]) -> list[int | None]:
        scores = [parse_score(reply) for reply in self.replies(items)]
        bad = sum(s is None for s in scores)
        if bad:
            logger.warning("%s: %d of %d replies had no score 0-3", self.name, bad, len(scores))
        return scores

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- factory


def make_judge(spec: str, *, model: Any = None, tokenizer: Any = None) -> Judge:
    """Build a judge from its spec, read by
    :func:`~persona_compass.backends.parse_backend_spec` with :data:`JUDGE_KINDS`.

    Args:
        spec: ``"none"``, ``"heuristic"``, ``"model:SPEC"`` (``"model:self"`` reuses
            ``model``/``tokenizer``) or ``"openai:URL[#model]"``.
        model, tokenizer: the model being studied, for ``"model:self"``.

    Raises:
        JudgeError: an unknown or malformed spec; the message lists the accepted forms.

    Example:
        >>> make_judge("heuristic").name
        'heuristic'
    """
    parsed = parse_backend_spec(
        spec,
        param="judge",
        allowed=JUDGE_KINDS,
        default_model=DEFAULT_OPENAI_JUDGE_MODEL,
        error=JudgeError,
    )
    if parsed.kind == "none":
        return NoJudge()
    if parsed.kind == "heuristic":
        return HeuristicJudge()
    if parsed.kind == "openai":
        return OpenAIJudge(parsed.base_url, parsed.model)
    if not parsed.is_self:
        return ModelJudge(parsed.model)
    if model is None or tokenizer is None:
        raise JudgeError(
            "judge spec 'model:self' reuses the model being studied, but no model and "
            "tokenizer were given; pass them, or name a model: 'model:ALIAS_OR_PATH'"
        )
    return ModelJudge(model, tokenizer)


# --------------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class LabelledItem:
    """A hand-labelled rollout from the judge sample."""

    item: JudgeItem
    label: int


def _rubric_for(role: str) -> str:
    """The shipped catalogue's rubric for a role, or ``""`` when it has none."""
    try:
        from .catalogue import load_catalogue

        return load_catalogue().role(role).rubric
    except PersonaCompassError:
        return ""


def load_judge_sample(path: str | Path | None = None) -> list[LabelledItem]:
    """Read a labelled sample: JSONL lines ``{"role", "question", "answer", "label"}``
    (optional ``"rubric"``; otherwise the catalogue's rubric for the role is used).

    Args:
        path: a JSONL file; ``None`` for the shipped ``data/judge_sample.jsonl``.

    Raises:
        JudgeError: the file is missing or a line is malformed (the message names the line).
    """
    if path is None:
        source = resources.files("persona_compass").joinpath("data").joinpath(SAMPLE_FILE)
        label = f"<package>/data/{SAMPLE_FILE}"
        text = source.read_text(encoding="utf-8")
    else:
        file = Path(path).expanduser()
        label = str(file)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise JudgeError(f"cannot read the judge sample {label}: {exc}") from exc
    rubrics: dict[str, str] = {}
    out: list[LabelledItem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{label}:{number}")
        except ValueError as exc:
            raise JudgeError(str(exc)) from exc
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("role", "question", "answer")
        ):
            raise JudgeError(f"{label}:{number} needs string 'role', 'question' and 'answer' keys")
        score = row.get("label")
        if isinstance(score, bool) or score not in SCORES:
            raise JudgeError(f"{label}:{number} has label={score!r}; it must be 0, 1, 2 or 3")
        role = row["role"]
        rubric = row.get("rubric")
        if not isinstance(rubric, str):
            if role not in rubrics:
                rubrics[role] = _rubric_for(role)
            rubric = rubrics[role]
        out.append(LabelledItem(JudgeItem(role, rubric, row["question"], row["answer"]), score))
    if not out:
        raise JudgeError(f"the judge sample {label} has no items")
    return out


def agreement(labels: Sequence[int], scores: Sequence[int | None]) -> dict[str, Any]:
    """Agreement of judge scores with labels.

    Returns a dict with ``n``, ``accuracy`` (exact score), ``kappa`` (Cohen's kappa over the
    four scores; an unreadable score ``None`` is its own, never-matching class),
    ``binary_accuracy`` (agreement on "3 or not"), ``unparsed`` (count of ``None``),
    ``label_counts`` and ``confusion`` (rows: label 0-3, columns: score 0-3 then ``None``).
    """
    if len(labels) != len(scores):
        raise JudgeError(f"{len(labels)} labels but {len(scores)} scores")
    n = len(labels)
    if n == 0:
        raise JudgeError("no labelled items to compare")
    confusion = [[0] * (len(SCORES) + 1) for _ in SCORES]
    for label, score in zip(labels, scores, strict=True):
        confusion[label][len(SCORES) if score is None else score] += 1
    observed = sum(confusion[s][s] for s in SCORES) / n
    row_totals = [sum(confusion[s]) for s in SCORES]
    col_totals = [sum(confusion[r][s] for r in SCORES) for s in SCORES]
    expected = sum(row_totals[s] * col_totals[s] for s in SCORES) / (n * n)
    kappa = 1.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    binary = sum(
        (label == IN_ROLE) == (score == IN_ROLE)
        for label, score in zip(labels, scores, strict=True)
    )
    return {
        "n": n,
        "accuracy": observed,
        "kappa": kappa,
        "binary_accuracy": binary / n,
        "unparsed": sum(s is None for s in scores),
        "label_counts": {s: row_totals[s] for s in SCORES},
        "confusion": confusion,
    }


def judge_agreement(judge: Judge, path: str | Path | None = None) -> dict[str, Any]:
    """Score the labelled sample with ``judge`` and compare with the labels
    (see :func:`agreement` for the keys; ``judge`` holds the judge's name)."""
    sample = load_judge_sample(path)
    scores = judge.score([s.item for s in sample])
    result = agreement([s.label for s in sample], scores)
    result["judge"] = judge.name
    return result


def heuristic_agreement(path: str | Path | None = None) -> dict[str, Any]:
    """How well :class:`HeuristicJudge` agrees with hand labels.

    Args:
        path: a labelled JSONL sample; ``None`` for the shipped one.

    Returns:
        ``{"n", "accuracy", "kappa", "binary_accuracy", "unparsed", "label_counts",
        "confusion", "judge"}``.

    Example:
        >>> round(heuristic_agreement()["binary_accuracy"], 2)  # doctest: +SKIP
        0.9
    """
    return judge_agreement(HeuristicJudge(), path)
