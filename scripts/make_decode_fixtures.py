#!/usr/bin/env python3
"""Reference text for decoding token ids that are not (yet) valid UTF-8.

For the stories260K tokenizer (SentencePiece-style, with byte-fallback tokens <0x00>..<0xFF>)
and the tokenizers of the fixture models (Llama/Mistral Metaspace, Qwen2 byte-level BPE),
writes id sequences and the text transformers' `decode(ids, skip_special_tokens=True)` gives
for each: characters cut off, invalid bytes, characters completed later, a valid character
followed by a broken one in the same run of byte tokens (which transformers turns into one
U+FFFD per byte), special tokens in between, and seeded random sequences. Run by hand, not
in CI (CI only reads tests/fixtures/decode.reference.json):

    .venv/bin/python scripts/make_decode_fixtures.py
"""

import json
import os
import random
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
STORIES = ROOT / "models" / "stories260K"
RANDOM_SEQUENCES = 60


def byte_level_alphabet():
    """GPT-2's byte → printable character map (the byte-level BPE vocabulary's first 256)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_ids(tok, kind):
    """Id of the token that stands for each byte value, or None when the vocabulary has none."""
    if kind == "byte-fallback":
        pieces = {b: f"<0x{b:02X}>" for b in range(256)}
    elif kind == "byte-level":
        pieces = byte_level_alphabet()
    else:
        return None
    ids = {b: tok.convert_tokens_to_ids(p) for b, p in pieces.items()}
    assert all(i is not None and i != tok.unk_token_id for i in ids.values()), kind
    return ids


def named_cases(tok, byte_id, word):
    """Hand-written sequences; `word` is an ordinary token."""
    specials = [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]
    # A leading space is dropped only at the very start of the text.
    cases = {
        "a word alone": [word],
        "words around a special token": [word] + specials[-1:] + [word, word],
        "special tokens only": specials,
    }
    if byte_id is None:
        return cases
    b = lambda data: [byte_id[x] for x in data]  # noqa: E731
    alpha, han, crab = "α".encode(), "中".encode(), "🦀".encode()
    cases |= {
        "two-byte character cut": b(alpha[:1]),
        "two-byte character complete": b(alpha),
        "cut character then a word": b(alpha[:1]) + [word],
        "valid character then a cut one, then a word": b(alpha + alpha[:1]) + [word],
        "valid character then a cut one at the end": b(alpha + alpha[:1]),
        "three-byte character completed later": [word] + b(han[:2]) + b(han[2:]) + [word],
        "four-byte character cut after three bytes": [word] + b(crab[:3]),
        "four-byte character complete": b(crab) + [word],
        "lone continuation byte": b(alpha[1:]) + [word],
        "invalid byte 0xFF": [word] + b(b"\xff") + [word],
        "overlong encoding of '/'": b(b"\xc0\xaf") + [word],
        "surrogate half": b(b"\xed\xa0\x80") + [word],
        "cut character then a new one": b(han[:2] + alpha) + [word],
    }
    if specials:
        cases["special token inside a character"] = b(alpha[:1]) + [specials[-1]] + b(alpha[1:])
        cases["special token after a cut character"] = [word] + b(han[:1]) + [specials[-1]]
    return cases


def random_case(rng, tok, byte_id, specials):
    """Mostly bytes of real characters, some cut, some random, with words and specials."""
    vocab = len(tok)
    ids = []
    for _ in range(rng.randint(1, 24)):
        r = rng.random()
        if byte_id is not None and r < 0.55:
            if rng.random() < 0.7:
                data = chr(rng.choice([rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xD7FF),
                                       rng.randint(0x10000, 0x1FFFF)])).encode()
                if rng.random() < 0.3:
                    data = data[: rng.randint(1, len(data))]
            else:
                data = bytes([rng.randint(0, 255)])
            ids += [byte_id[x] for x in data]
        elif specials and rng.random() < 0.15:
            ids.append(rng.choice(specials))
        else:
            ids.append(rng.randrange(vocab))
    return ids


def cases_for(name, path, kind, seed):
    tok = AutoTokenizer.from_pretrained(path)
    assert not tok.clean_up_tokenization_spaces, f"{name}: decode would also clean up spaces"
    byte_id = byte_ids(tok, kind)
    word = tok.convert_tokens_to_ids(tok.tokenize(" the")[-1])
    specials = sorted(set(tok.all_special_ids))
    rng = random.Random(seed)
    named = named_cases(tok, byte_id, word)
    sequences = [(label, ids) for label, ids in named.items()]
    sequences += [(f"random {i}", random_case(rng, tok, byte_id, specials)) for i in range(RANDOM_SEQUENCES)]
    return {
        "tokenizer": os.path.relpath(path, ROOT),
        "kind": kind,
        "cases": [
            {"name": label, "ids": ids, "text": tok.decode(ids, skip_special_tokens=True)}
            for label, ids in sequences
        ],
    }


def main():
    tokenizers = [
        ("stories260K", STORIES, "byte-fallback"),
        ("llama-f32", FIXTURES / "models" / "llama-f32", "metaspace"),
        ("mistral-bf16-sharded", FIXTURES / "models" / "mistral-bf16-sharded", "metaspace"),
        ("qwen2-f16", FIXTURES / "models" / "qwen2-f16", "byte-level"),
    ]
    out = {"transformers": transformers.__version__, "tokenizers": {}}
    for seed, (name, path, kind) in enumerate(tokenizers):
        out["tokenizers"][name] = cases_for(name, path, kind, seed)
        broken = sum("\ufffd" in c["text"] for c in out["tokenizers"][name]["cases"])
        print(f"{name}: {len(out['tokenizers'][name]['cases'])} sequences, {broken} with U+FFFD")
    (FIXTURES / "decode.reference.json").write_text(compact(out))


def compact(out):
    """JSON with one case per line."""
    dump = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    blocks = []
    for name, t in out["tokenizers"].items():
        cases = ",\n".join(f"    {dump(c)}" for c in t["cases"])
        blocks.append(
            f'  {dump(name)}: {{"tokenizer": {dump(t["tokenizer"])}, "kind": {dump(t["kind"])}, '
            f'"cases": [\n{cases}\n  ]}}'
        )
    body = ",\n".join(blocks)
    return f'{{"transformers": {dump(out["transformers"])}, "tokenizers": {{\n{body}\n}}}}\n'



if __name__ == "__main__":
    main()
