"""Chat-format instruction tuning (``task: chat``, decoder-only): conversation -> tokens + loss mask.

A record's ``messages`` (checked by ``jaxft.data.chat_messages``) are rendered to one text with a
Jinja chat template, that text is tokenized once (whole, with each token's character span), and
the loss mask is 1 on the tokens that overlap an assistant span:

    tokens  = encode(template(messages))      (the template writes bos / turn tokens itself)
    mask    = 1 on a token whose characters overlap an assistant span, else 0
    inputs  = tokens[:-1]   targets = tokens[1:]   weights = mask[1:]

so the ids are those of HF ``tokenizer.apply_chat_template(messages, tokenize=True)`` and the
mask is its ``return_assistant_tokens_mask`` (the same overlap rule).

**The template** (``data.chat_template``): ``chatml`` or ``llama3`` (built in, below), a Jinja
string, or unset: the HF tokenizer's own (``chat_template.jinja`` / ``tokenizer_config.json`` of
``data.tokenizer.path``).  Rendered as transformers does: a sandboxed Jinja environment
(``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
``raise_exception``, ``tojson``), with ``messages``, ``add_generation_prompt`` and the
tokenizer's ``bos_token`` / ``eos_token`` strings.

**Assistant spans** (character ranges of the rendered text), by one of two methods:

* generation markers: a template with ``{% generation %}...{% endgeneration %}`` (the built-in
  ones: the assistant content and its end-of-turn token) -- the span of each block, as
  transformers records it;
* prefix rendering, for templates without markers (most released ones): for each assistant
  message i, ``head`` = the messages before it rendered with ``add_generation_prompt=True`` and
  ``turn`` = the messages up to it; the span is ``turn[len(head):]`` without trailing whitespace
  (the content and the end-of-turn token, not the newline ChatML writes after it).  This needs a
  prefix-stable template (``head`` a prefix of ``turn``, ``turn`` of the whole text); one that
  rewrites earlier turns (e.g. drops their reasoning) is a ``DataError``: add markers to it.

A template-written bos / eos string that the tokenizer does not match in text (SentencePiece
control pieces such as ``<s>``) becomes its id; every other special token (``<|im_start|>``)
must be one piece of the vocabulary (a run that trains its tokenizer adds those of the template:
``template_special_tokens``).  Over ``data.seq_len`` (``data.overlong``): ``skip`` / ``error`` as
the other tasks; ``truncate`` keeps the first ``seq_len + 1`` tokens (a conversation left with
no assistant token is skipped, counted as over-long).

**At inference** (``jaxft chat``, ``jaxft translate --chat``) the same ``ChatEncoder`` renders the
conversation so far with ``add_generation_prompt=True`` (``prompt``: the ids of HF
``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``), drops the oldest
exchanges of a history over the model's length (``fit``), and names the token that ends an
assistant turn (``end_of_turn``), where generation stops.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxft.data.chat_messages import load_messages
from jaxft.data.readers import DataError, Example
from jaxft.data.tasks import OverlongError, TaskStats

SETTING = "data.chat_template"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_.\-]+\|>")
_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
_TRACKING: contextvars.ContextVar = contextvars.ContextVar("jaxft_chat_spans", default=None)


def template_special_tokens(setting: str | None) -> list[str]:
    """The ``<|...|>`` tokens a built-in or configured template writes: pieces a tokenizer trained
    for it needs (``jaxft.data.vocab.required_pieces``); none for an unset (tokenizer's) template."""
    source = BUILTIN_TEMPLATES.get(setting, setting) if setting else ""
    return list(dict.fromkeys(_SPECIAL.findall(source)))


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """The Jinja template, in a sandboxed environment set up as transformers' chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: records the block's span while tracking."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class ChatTemplate:
    """A chat template (Jinja source) with the tokenizer's special-token strings; ``what`` names it
    in errors (the config key, or the tokenizer it came from)."""

    def __init__(self, source: str, what: str, variables: dict[str, str]):
        import jinja2

        self.source, self.what, self.variables = source, what, variables
        self.markers = bool(_MARKER.search(source))
        try:
            compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{what}: not a valid Jinja template (line {e.lineno}: {e.message})") from None

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
               spans: list | None = None) -> str:
        """The text; with ``spans`` (a list) the ``{% generation %}`` blocks' spans are added to it."""
        import jinja2

        blocks: list[str] = []
        token = _TRACKING.set((blocks, spans) if spans is not None else None)
        try:
            for block in compile_template(self.source).generate(
                    messages=list(messages), add_generation_prompt=add_generation_prompt, **self.variables):
                blocks.append(block)
        except jinja2.TemplateError as e:
            raise DataError(f"{self.what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:
            _TRACKING.reset(token)
        return "".join(blocks)

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered text, the character spans of the assistant turns) (module docstring)."""
        if self.markers:
            spans: list[tuple[int, int]] = []
            text = self.render(messages, spans=spans)
            return text, [s for s in spans if s[1] > s[0]]
        text, spans = self.render(messages), []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if not (turn.startswith(head) and text.startswith(turn)):
                raise DataError(f"{self.what}: not prefix-stable at message {i} (rendering the conversation "
                                f"up to an assistant turn changes earlier text); mark the assistant content "
                                f"with {{% generation %}}...{{% endgeneration %}}")
            spans.append((len(head), max(len(head), len(turn.rstrip()))))
        return text, [s for s in spans if s[1] > s[0]]


def resolve_template(setting: str | None, tokenizer: Any) -> ChatTemplate:
    """``data.chat_template`` resolved: a built-in name, a Jinja string, or None -> the tokenizer's."""
    if setting is None:
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise DataError(f"{SETTING}: not set and tokenizer {getattr(tokenizer, 'path', None)} has no chat "
                            f"template; set it to {' / '.join(BUILTIN_TEMPLATES)} or a Jinja template")
        what = f"the chat template of {tokenizer.path}"
    elif setting in BUILTIN_TEMPLATES:
        source, what = BUILTIN_TEMPLATES[setting], f"{SETTING} ({setting})"
    elif "{" not in setting:
        raise DataError(f"{SETTING}: {setting!r} is neither a built-in template "
                        f"({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template")
    else:
        source, what = setting, SETTING
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    return ChatTemplate(source, what, {k: tokenizer.id_to_piece(i) for k, i in ids.items() if i is not None})


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 on each token whose ``[start, end)`` overlaps a span (both in order), as transformers."""
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = int(end > spans[k][0])
    return mask


class ChatEncoder:
    """A chat template with its tokenizer: conversations -> token ids, as transformers'
    ``apply_chat_template(..., tokenize=True)``.  Training (``ChatFeaturizer``) and inference
    (``jaxft chat``, ``jaxft translate --chat``: ``prompt``, ``fit``, ``end_of_turn``) share it, so
    a model is prompted with exactly the tokens it was trained on."""

    def __init__(self, tokenizer: Any, chat_template: str | None):
        if not hasattr(tokenizer, "encode_with_offsets"):
            raise DataError(f"task chat: tokenizer {tokenizer!r} gives no character offsets")
        self.tokenizer = tokenizer
        self.template = resolve_template(chat_template, tokenizer)
        ids = {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
        # bos / eos strings the tokenizer reads as text (SentencePiece control pieces): split out
        self.split = {s: i for s, i in ids.items() if s and tokenizer.encode(s) != [i]}

    def encode_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's character span."""
        if not self.split:
            return self.tokenizer.encode_with_offsets(text)
        ids, offsets, at = [], [], 0
        for part in re.split("(" + "|".join(map(re.escape, self.split)) + ")", text):
            if part in self.split:
                ids.append(self.split[part])
                offsets.append((at, at + len(part)))
            elif part:
                more, spans = self.tokenizer.encode_with_offsets(part)
                ids += more
                offsets += [(at + a, at + b) for a, b in spans]
            at += len(part)
        return ids, offsets

    def encode(self, messages: Sequence[dict], where: str = "") -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of a whole conversation, before the over-long policy."""
        try:
            text, spans = self.template.assistant_spans(messages)
        except DataError as e:
            raise DataError(f"{where}: {e}" if where else str(e)) from None
        ids, offsets = self.encode_text(text)
        return ids, token_mask(offsets, spans)

    def prompt(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant header: what generation continues
        (HF ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``)."""
        return self.encode_text(self.template.render(messages, add_generation_prompt=True))[0]

    def fit(self, messages: Sequence[dict], budget: int) -> tuple[list[int], list[dict], bool]:
        """(prompt ids, the messages kept, cut) for a prompt of at most ``budget`` tokens: while it
        is longer, the oldest exchange (the first non-system message up to the next user one) is
        dropped; system messages and the last user turn stay.  A prompt still too long keeps its
        last ``budget`` tokens (``cut``: its start, the system prompt with it, is lost)."""
        if budget < 1:
            raise ValueError(f"chat: no room for a prompt ({budget} tokens left)")
        kept = list(messages)
        while len(ids := self.prompt(kept)) > budget:
            first = next((i for i, m in enumerate(kept) if m["role"] != "system"), len(kept))
            after = next((j for j in range(first + 1, len(kept)) if kept[j]["role"] == "user"), None)
            if after is None:
                return ids[-budget:], kept, True
            kept = kept[:first] + kept[after:]
        return ids, kept, False

    def end_of_turn(self) -> int | None:
        """The id of the token the template ends an assistant turn with (``<|im_end|>``,
        ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``): the ``<...>`` token right after the reply
        (after whitespace) in a rendered exchange; None if the template writes none there."""
        reply = "jaxftreplyend"
        try:
            text = self.template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}])
        except DataError:
            return None
        at = text.rfind(reply)
        rest = text[at + len(reply):] if at >= 0 else ""
        start = len(text) - len(rest.lstrip())
        found = re.match(r"<[^<>\s]+>", text[start:])
        if found is None:
            return None
        ids, offsets = self.encode_text(text)
        return next((i for i, span in zip(ids, offsets) if span == (start, start + found.end())), None)


class ChatFeaturizer(ChatEncoder):
    """Callable: a chat Example -> {"inputs","targets","weights"} arrays, or None (skipped); the
    interface of ``jaxft.data.tasks.Featurizer`` (``limits``, ``lengths``, ``describe``, ``stats``)."""

    def __init__(self, tokenizer: Any, *, seq_len: int, chat_template: str | None, overlong: str,
                 source: str = "?"):
        if overlong not in ("skip", "truncate", "error"):
            raise ValueError(f"data.overlong must be skip, truncate or error, got {overlong!r}")
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {seq_len}")
        super().__init__(tokenizer, chat_template)
        self.seq_len, self.overlong, self.source = seq_len, overlong, source
        self.stats = TaskStats()

    @property
    def limits(self) -> tuple[int, ...]:
        return (self.seq_len,)

    def lengths(self, examples: Sequence[Example]) -> np.ndarray:
        """``[n, 1]`` int: each conversation's length (tokens - 1), before the policy."""
        return np.array([[len(self.encode(load_messages(ex.tgt), ex.where)[0]) - 1] for ex in examples],
                        np.int64).reshape(len(examples), 1)

    def describe(self, lengths: Sequence[int]) -> str:
        return f"conversation of {int(lengths[0])} tokens > data.seq_len={self.seq_len}"

    def tokens(self, example: Example) -> tuple[list[int], list[int]] | None:
        """(tokens, loss mask) after the over-long policy; None if skipped."""
        ids, mask = self.encode(load_messages(example.tgt), example.where)
        if len(ids) - 1 > self.seq_len:
            if self.overlong == "error":
                raise OverlongError(f"source {self.source!r}: {self.describe([len(ids) - 1])} "
                                    f"(data.overlong: skip or truncate would handle it)")
            ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
            if self.overlong == "skip" or not any(mask[1:]):
                self.stats.overlong_skipped += 1
                return None
            self.stats.truncated += 1
        self.stats.examples += 1
        return ids, mask

    def __call__(self, example: Example) -> dict[str, np.ndarray] | None:
        out = self.tokens(example)
        if out is None:
            return None
        t = np.asarray(out[0], np.int32)
        return {"inputs": t[:-1], "targets": t[1:], "weights": np.asarray(out[1][1:], np.float32)}

