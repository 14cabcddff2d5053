"""`shoal chat`: a conversation with a checkpoint in the terminal.

    shoal chat --source CKPT|EXPERIMENT|HF_DIR [--system_prompt S] [--max_new_tokens N]
               [--temperature T --top_p P --top_k K --seed S | --greedy]

Each turn sends the whole conversation so far through the tokenizer's chat template and streams
the answer. `/reset` forgets the conversation, `/exit` (or Ctrl-D) leaves; Ctrl-C while an answer
is coming stops that answer (what was printed stays in the history) and waits for the next
message; Ctrl-C at the prompt only clears the line. When the conversation outgrows the model's
context, the oldest turns are dropped (the system prompt stays), and that is said.
"""

from __future__ import annotations

import argparse
import sys

from shoal.generate.command import add_model_arguments, sampling_settings

USER_PROMPT = "you: "
ASSISTANT_PREFIX = "assistant: "
HELP = "/reset forgets the conversation, /exit leaves; Ctrl-C stops an answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def _fit(messages: list[dict[str, str]], encode, room: int) -> tuple[list[dict[str, str]], list[int], int]:
    """The newest turns (and the system prompt) whose template fits in `room` tokens; how many were dropped."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = encode(system + turns)
        if len(ids) <= room or len(turns) <= 1:
            return system + turns, ids, dropped
        turns, dropped = turns[2:] if len(turns) > 2 else turns[1:], dropped + 1


def main(args: argparse.Namespace) -> int:
    from shoal.errors import ShoalError
    from shoal.generate.decode import generate_tokens
    from shoal.generate.load import load_for_generation
    from shoal.generate.prompts import apply_chat_template
    from shoal.generate.stream import TextStream

    loaded = load_for_generation(args.source, device=args.device, dtype=args.dtype, which=args.checkpoint,
                                 base=args.base_checkpoint)
    settings = sampling_settings(args, loaded.generation_config)
    stops = loaded.stop_token_ids(chat=True)
    tokenizer = loaded.tokenizer
    encode = lambda messages: apply_chat_template(tokenizer, messages)  # noqa: E731
    encode([{"role": "user", "content": "hi"}])  # no chat template: say so before the first question
    for note in loaded.notes:
        print(f"shoal chat: {note}", file=sys.stderr)
    print(f"shoal chat: {loaded.description}; {settings.describe()}\nshoal chat: {HELP}", file=sys.stderr)
    room = loaded.model.config.max_position_embeddings - args.max_new_tokens
    if room < 1:
        raise ShoalError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a conversation in the "
                         f"model's {loaded.model.config.max_position_embeddings} positions")

    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()  # Ctrl-C at the prompt: a fresh line, not the end of the conversation
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(system)
            print("(conversation reset)", flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", flush=True)
            continue
        messages.append({"role": "user", "content": text})
        messages, ids, dropped = _fit(messages, encode, room)
        if dropped:
            print(f"(dropped the {dropped} oldest exchange(s) to fit the model's context)", flush=True)
        if len(ids) > room:
            print(f"(this message alone is {len(ids)} tokens, more than the {room} the model has room for)",
                  flush=True)
            messages.pop()
            continue
        sys.stdout.write(ASSISTANT_PREFIX)
        stream = TextStream(tokenizer)
        try:
            generate_tokens(loaded.model, [ids], args.max_new_tokens, settings, stops,
                            on_token=lambda row, token, stream=stream: stream.push(token))
            answer = stream.finish()
        except KeyboardInterrupt:
            answer = stream.finish()
            print("(stopped)", flush=True)
        messages.append({"role": "assistant", "content": answer})
