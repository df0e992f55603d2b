"""`jaxft chat`: talk to a decoder-only model (a run dir, a jaxft folder or an HF folder) through
the chat template it was trained with (a run's `data.chat_template`, else the tokenizer's own;
`--chat-template` overrides), rendered by `jaxft.data.chat.ChatEncoder` as in training.

Interactive: each stdin line is a user turn (empty lines are skipped); the reply, decoded with
the decode flags (greedy by default) until the template's end-of-turn token or eos, goes to
stdout, one per turn, and joins the history (system prompt, user and assistant turns).  A history
over the model's length loses its oldest exchanges, with a note on stderr.  Through a pipe stdout
carries only the replies; the prompt and the info line appear only on a terminal.

`--messages FILE.jsonl`: one ``{"messages": [...]}`` conversation per line, ending with a user
turn; decoded in length-sorted batches, streamed in chunks; one JSON line out per record in: the
record with the reply appended to its messages (as an assistant message) and as ``"reply"``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from jaxft.commands.evaluate import MODEL_HELP, TRANSLATE_CHUNK, add_decode_flags, add_template_flags, decode_config
from jaxft.commands.export import checkpoint_choice


def _records(path: Path):
    """(where, record, messages) of each non-empty line of a messages JSONL file, streamed."""
    from jaxft.data.chat_messages import prompt_messages
    from jaxft.data.readers import read_text_lines

    for n, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None
        yield where, rec, prompt_messages(rec, where)


def _note(text: str) -> None:
    print(f"jaxft chat: {text}", file=sys.stderr, flush=True)


def _fit(chat, messages: list[dict], budget: int, where: str) -> tuple[list[int], list[dict]]:
    """The prompt ids and the messages kept, with a note on stderr when the history was shortened."""
    ids, kept, cut = chat.fit(messages, budget)
    if len(kept) < len(messages):
        _note(f"{where}: over {budget} prompt tokens: dropped the {len(messages) - len(kept)} oldest messages")
    if cut:
        _note(f"{where}: the last turn alone is over {budget} prompt tokens: kept its last {budget}")
    return ids, kept


def _batch(translator, chat, args: argparse.Namespace, decode, budget: int) -> None:
    system = [{"role": "system", "content": args.system}] if args.system else []
    records = _records(args.messages)
    done = 0
    while chunk := list(itertools.islice(records, TRANSLATE_CHUNK)):
        convs = [m if m[0]["role"] == "system" else system + m for _, _, m in chunk]
        prompts = [_fit(chat, conv, budget, where)[0] for (where, _, _), conv in zip(chunk, convs)]
        desc = None if args.quiet else f"conversations {done + 1}-{done + len(chunk)}"
        for (_, rec, messages), reply in zip(chunk, translator.reply(prompts, decode, args.batch_size, desc=desc)):
            out = {**rec, "messages": messages + [{"role": "assistant", "content": reply}], "reply": reply}
            print(json.dumps(out, ensure_ascii=False))
        sys.stdout.flush()
        done += len(chunk)


def _user_lines(prompt: bool):
    """Lines of stdin, read one at a time (a terminal: after a ``> `` prompt on stderr)."""
    from jaxft.data.readers import read_text_lines

    stdin = getattr(sys.stdin, "buffer", None)
    lines = read_text_lines(stdin, "<stdin>") if stdin else (line.rstrip("\n") for line in sys.stdin)
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = next(lines, None)
        if line is None:
            return
        yield line


def _interactive(translator, chat, args: argparse.Namespace, decode, budget: int, terminal: bool) -> None:
    import jax

    history = [{"role": "system", "content": args.system}] if args.system else []
    key = jax.random.key(args.seed)
    for turn, line in enumerate(_user_lines(terminal)):
        if not line.strip():
            continue
        ids, history = _fit(chat, history + [{"role": "user", "content": line}], budget, f"turn {turn + 1}")
        reply = translator.reply([ids], decode, 1, rng=jax.random.fold_in(key, turn))[0]
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})


def cmd_chat(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxft.eval.translate import load_translator

    if args.messages:  # a bad file fails before the model loads (streamed: O(1) memory)
        for _ in _records(args.messages):
            pass
    translator, _ = load_translator(args.source, args.checkpoint)
    if translator.encoder_decoder:
        raise ValueError(f"chat: {args.source} is an encoder-decoder model ({translator.model_cfg.family}); "
                         f"jaxft chat needs a decoder-only one")
    if args.chat_template:
        translator.data_cfg = dataclasses.replace(translator.data_cfg, chat_template=args.chat_template)
    chat, decode = translator.chat_encoder(), decode_config(args)
    budget = translator.chat_budget(decode.max_len)
    if args.messages:
        _batch(translator, chat, args, decode, budget)
        return 0
    terminal = sys.stdin.isatty() and sys.stderr.isatty()
    if terminal and not args.quiet:
        stop = [translator.tokenizer.id_to_piece(i) for i in translator.stop_ids(True)]
        _note(f"{args.source}, {chat.template.what}, replies end at {' / '.join(stop) or f'{decode.max_len} tokens'}; "
              f"one line per turn, Ctrl-D to end")
    _interactive(translator, chat, args, decode, budget, terminal)
    return 0


def register(sub, command) -> None:
    p = command(sub, "chat", cmd_chat, help="chat with a decoder-only run dir, jaxft folder or HF folder through "
                "its chat template (stdin turns -> stdout replies), or answer --messages conversations")
    p.add_argument("source", help=MODEL_HELP)
    p.add_argument("--messages", type=Path, metavar="FILE.jsonl", help="answer each {\"messages\": [...]} line "
                   "(ending with a user turn); one JSON line out per line in (default: interactive on stdin)")
    p.add_argument("--checkpoint", type=checkpoint_choice, default="latest", metavar="latest|best|N",
                   help="run dirs: the newest, the best or the step-N checkpoint (default: latest)")
    add_template_flags(p)
    add_decode_flags(p, "greedy")
    p.add_argument("--batch-size", type=int, default=16, help="--messages: conversations decoded together")
    p.add_argument("--seed", type=int, default=0, help="sampling: the key of turn t is fold_in(key(seed), t)")
    p.add_argument("--quiet", action="store_true", help="no info line or progress bar (only on a terminal anyway)")
