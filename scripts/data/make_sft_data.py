"""Generate flashlm's small synthetic instruction dataset: arithmetic and string tasks whose
answers can be checked exactly.

    python scripts/data/make_sft_data.py [--out data/sft] [--train 2800] [--test 280] [--seed 0]

Writes ``train.jsonl`` and ``test.jsonl`` (held out: no prompt of it is in train) under
``--out``, one chat example per line::

    {"messages": [{"role": "user", "content": "What is 23 + 18?"},
                  {"role": "assistant", "content": "41"}], "task": "add"}

The tasks, in equal shares, are sized for the CPU debug model (about 1M parameters, trained on
novels) to learn some of them in a few minutes and not others:

    add       What is 23 + 18?                   41
    larger    Which is larger, 37 or 52?         52
    next      What number comes after 49?        50
    reverse   Reverse: c a t s                   s t a c
    sort      Sort: 7 2 9                        2 7 9
    count     Count the words: tea cake jam      3
    last      Last word: tea cake jam            jam

The output is a pure function of the arguments, so the committed files can be regenerated.
"""

import argparse
import json
import random
import string
import sys
from pathlib import Path

# Short words that the bundled tokenizer mostly keeps whole.
WORDS = ("tea cake jam house garden letter sister brother mother father horse ship sea rain wind "
         "book door hand room walk ball dance music river field town road church friend heart").split()


def add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", str(a + b)


def larger(rng):
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def next_number(rng):
    n = rng.randint(0, 98)
    return f"What number comes after {n}?", str(n + 1)


def reverse(rng):
    letters = rng.choices(string.ascii_lowercase, k=rng.randint(3, 5))
    return f"Reverse: {' '.join(letters)}", " ".join(reversed(letters))


def sort_digits(rng):
    digits = rng.choices(string.digits, k=rng.randint(3, 5))
    return f"Sort: {' '.join(digits)}", " ".join(sorted(digits))


def count_words(rng):
    words = rng.choices(WORDS, k=rng.randint(2, 7))
    return f"Count the words: {' '.join(words)}", str(len(words))


def last_word(rng):
    words = rng.choices(WORDS, k=rng.randint(2, 6))
    return f"Last word: {' '.join(words)}", words[-1]


TASKS = {"add": add, "larger": larger, "next": next_number, "reverse": reverse, "sort": sort_digits,
         "count": count_words, "last": last_word}


def generate(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) examples: each task gets an equal share; test prompts are drawn first and
    never repeated, and train never contains a test prompt (train may repeat its own)."""
    rng = random.Random(seed)
    test, train, held = [], [], set()
    for split, n in (("test", n_test), ("train", n_train)):
        for i in range(n):
            name = list(TASKS)[i % len(TASKS)]
            for _ in range(1000):
                prompt, answer = TASKS[name](rng)
                if prompt not in held:
                    break
            else:
                raise RuntimeError(f"task {name!r} ran out of prompts not held out for test")
            if split == "test":
                held.add(prompt)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            (test if split == "test" else train).append({"messages": messages, "task": name})
    return train, test


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sft", help="output folder (default data/sft)")
    parser.add_argument("--train", type=int, default=2800, help="training examples (default 2800)")
    parser.add_argument("--test", type=int, default=280, help="held-out examples (default 280)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = generate(args.train, args.test, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in (("train", train), ("test", test)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
        print(f"wrote {len(examples)} examples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
