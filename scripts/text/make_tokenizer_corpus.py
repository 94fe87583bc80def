#!/usr/bin/env python3
"""Writes the tokenizer test corpus under tests/data/text/tokenizer_corpus/.

Everything here is written for dsv4 (no third-party text): short hand-written
snippets in many scripts, recombined deterministically with a seeded RNG so the
corpus is large (>= 200 KB) yet reproducible.  Output is byte-exact: files are
written in binary mode, so \\r\\n and lone \\r survive.

Outputs (all committed):
  <name>.txt          corpus files, encoded whole by the oracle and by dsv4
  cases.json          short edge-case strings, each encoded on its own
  decode_cases.json   id sequences for decode (incl. ids that split UTF-8)

Expected ids come from scripts/text/gen_tokenizer_oracle.py (run on a machine
with the Python `tokenizers` package; see docs/TESTING.md).

Usage: python3 scripts/text/make_tokenizer_corpus.py [out_dir]
"""
import json
import os
import random
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "..", "tests", "data", "text", "tokenizer_corpus")

# ----------------------------------------------------------------------------
# English: templates and word pools (written for this corpus).
SUBJECTS = ["The server", "A tokenizer", "Our build script", "The scheduler", "Every request", "This kernel",
            "The old cache", "A careful reviewer", "The test suite", "She", "He", "They", "We", "I",
            "The model", "A small benchmark", "The engineer on call", "Nobody", "The parser", "The user"]
VERBS = ["reads", "writes", "splits", "rejects", "measures", "streams", "caches", "decodes", "encodes",
         "retries", "counts", "sorts", "loads", "checks", "compares", "ignores", "logs", "returns"]
OBJECTS = ["the input bytes", "every token", "a list of ids", "the merge table", "three small files",
           "the whole corpus", "its own output", "a broken UTF-8 sequence", "the longest match",
           "two hundred kilobytes of text", "the first 4096 entries", "a JSON array", "the newline",
           "twelve thousand words", "an empty string", "the configuration", "a priority queue"]
ADVERBS = ["quickly", "slowly", "twice", "again", "without complaint", "in order", "at night", "by hand",
           "on one core", "for every shard", "as expected", "before lunch", "in 3.5 ms", "at 20 MB/s"]
CONNECT = ["but", "and", "so", "because", "although", "while", "until", "unless", "since", "whereas"]
EXTRA = ["Isn't that odd?", "Don't worry.", "It's fine, I'll check.", "We'd rather not.", "You're right!",
         "They've shipped it.", "He'll see; she'd agree.", "Won't it fail?", "(Probably not.)",
         "\"Quoted text\" works too.", "'Single quotes' as well.", "e.g. this, i.e. that, etc.",
         "Mr. Smith paid $1,234.56 on 2024-03-15.", "Call +1 (555) 010-9999 ext. 42.",
         "See https://example.com/path?q=1&r=two#frag for details.", "Mail ops@example.org, not root@localhost.",
         "Version v2.10.3-rc1 replaced v2.9.", "It costs 10% more -- or ~3x.", "A/B tests; 50/50 split.",
         "Temperature: -40°C = -40°F.", "Ratio 3:2, score 7-5, room #12B.", "O'Neil's café re-opened.",
         "ALL CAPS SHOUTING, MixedCase, camelCaseWords and snake_case_words.", "Ellipsis... and dash—like so.",
         "Naïve coöperation; façade; résumé; jalapeño.", "“Curly quotes” and ‘single ones’."]


def english(rng, n_paragraphs):
    out = []
    for _ in range(n_paragraphs):
        sents = []
        for _ in range(rng.randint(2, 7)):
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ADVERBS)}"
            if rng.random() < 0.4:
                s += f", {rng.choice(CONNECT)} {rng.choice(SUBJECTS).lower()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            s += rng.choice([".", ".", ".", "!", "?", ";", ":"])
            sents.append(s)
            if rng.random() < 0.3:
                sents.append(rng.choice(EXTRA))
            if rng.random() < 0.15:
                sents.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        out.append(" ".join(sents))
    return "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------
CODE_SNIPPETS = [
    """#include <vector>
#include <cstdint>

// Sum a vector of ints.
int64_t sum(const std::vector<int32_t>& v) {
\tint64_t s = 0;
\tfor (auto x : v) s += x;
\treturn s;
}
""",
    """def merge(a, b):
    \"\"\"Merge two sorted lists.\"\"\"
    i = j = 0
    out = []
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
""",
    """const fetchAll = async (urls) => {
  const res = await Promise.all(urls.map((u) => fetch(u)));
  return res.filter((r) => r.ok).map((r) => r.status ?? 200);
};
export default fetchAll;
""",
    """fn main() -> Result<(), Box<dyn std::error::Error>> {
    let xs: Vec<u32> = (0..10).map(|i| i * i).collect();
    println!("{:?} {}", xs, xs.iter().sum::<u32>());
    Ok(())
}
""",
    """#!/usr/bin/env bash
set -euo pipefail
for f in "$@"; do
  [[ -f "$f" ]] || { echo "missing: $f" >&2; exit 1; }
  wc -l -- "$f" | awk '{print $1}'
done
""",
    """{"name": "dsv4", "version": "0.1.0", "ids": [0, 1, 128798], "nested": {"a": null, "b": true, "c": -1.5e-3}}
""",
    """SELECT u.id, COUNT(*) AS n FROM users u JOIN orders o ON o.user_id = u.id
WHERE o.created_at >= '2024-01-01' GROUP BY u.id HAVING n > 3 ORDER BY n DESC LIMIT 10;
""",
    """<html><body><div class="x" id='y'>&lt;tag&gt; &amp; text</div><!-- comment --></body></html>
""",
    """    if (x != nullptr && *x >= 0x7fffffff) { return -EINVAL; }  // overflow?
        y <<= 2; z >>= 3; w ^= ~v; p->q[i++] = r ? s : t;
""",
    """matrix = [[1, 2, 3],
          [4, 5, 6],
          [7, 8, 9]]
print(sum(map(sum, matrix)))  # 45
lambda_ = lambda *args, **kw: (args, kw)
""",
    """template <typename T, std::size_t N>
constexpr auto make_array(T (&&a)[N]) noexcept -> std::array<T, N> {
    return std::to_array(std::move(a));
}
""",
    """diff --git a/src/x.cpp b/src/x.cpp
@@ -1,3 +1,4 @@
-int a = 1;
+int a = 2;
+int b = a * 2;
""",
]


def code(rng, n):
    parts = []
    for _ in range(n):
        s = rng.choice(CODE_SNIPPETS)
        r = rng.random()
        if r < 0.2:
            s = s.replace("\n", "\r\n")
        elif r < 0.3:
            s = s.replace("    ", "\t")
        elif r < 0.4:
            s = s.replace("    ", " " * rng.randint(5, 17))
        parts.append(s)
        if rng.random() < 0.3:
            parts.append("\n" * rng.randint(1, 4))
    return "".join(parts)


# ----------------------------------------------------------------------------
CHINESE = ["今天天气很好，我们去公园散步吧。", "分词器把文本切成词元，然后映射成编号。", "这个服务器使用原生的C++和CUDA编写。",
           "请在三秒钟内回答：一加一等于几？", "他说：“明天见！”然后走了。", "数据中心里有八块显卡，每块一百四十吉字节显存。",
           "龥是一个很少见的汉字，而𠀀在扩展区B里。", "第12章第3节讨论了2024年的结果。", "中文标点：，。！？；：“”‘’（）【】《》、……——",
           "测试用例必须能够失败，否则它们没有意义。", "模型输出了一个工具调用，参数是JSON格式的。"]
JAPANESE = ["今日はいい天気ですね。", "トークナイザーはテキストを分割します。", "ひらがな、カタカナ、漢字が混ざっている文章。",
            "ｶﾀｶﾅの半角もあります。", "東京駅から新幹線で大阪へ行きました。", "「こんにちは」と彼女は言った。",
            "ー（長音符）やゝゞヽヾも使います。", "ゔ、ゟ、ヿ、゠などの珍しい文字。", "日本語の文章には空白がありません。"]
KOREAN = ["안녕하세요, 반갑습니다.", "토크나이저는 텍스트를 나눕니다.", "한국어 문장에는 띄어쓰기가 있습니다.",
          "서울에서 부산까지 KTX로 두 시간 반 걸려요.", "ㄱㄴㄷㄹ 자모와 ᄀᄁ 옛 자모.", "오늘 날씨가 정말 좋네요!"]


def cjk(rng, n):
    out = []
    for _ in range(n):
        pool = rng.choice([CHINESE, JAPANESE, KOREAN, CHINESE + JAPANESE + KOREAN])
        k = rng.randint(1, 6)
        sep = rng.choice(["", "", " ", "\n", "　"])
        s = sep.join(rng.choice(pool) for _ in range(k))
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 99999)} "
        if rng.random() < 0.2:
            s += rng.choice(["OK", "Python3", "GPU", "abc"])
        out.append(s)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
SCRIPTS = [
    "مرحبا بالعالم! كيف حالك اليوم؟", "اللغة العربية تُكتب من اليمين إلى اليسار، ١٢٣٤٥٦٧٨٩٠.", "شُكْرًا جَزِيلًا",
    "שלום עולם, מה שלומך?", "Привет, мир! Ёжик съел 15 яблок.", "Γειά σου κόσμε· αβγδε ΑΒΓΔΕ.",
    "नमस्ते दुनिया, यह एक परीक्षण है।", "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ", "გამარჯობა მსოფლიო",
    "Բարեւ աշխարհ", "Xin chào thế giới, tiếng Việt có dấu.", "Türkçe: ğüşıöç İĞÜŞÖÇ.", "Ελληνικά: ά έ ή ί ό ύ ώ ΐ ΰ",
    "Zalgo: Z̵̡̧a̸̛͝l̴̢̛g̶̨̛o̷̧͝ t̴e̵x̶t̷", "Combining: e\u0301 a\u0300 o\u0308 n\u0303 u\u0328 c\u0327 \u0301alone",
    "Hangul jamo: \u1100\u1161\u11a8 vs 각", "Devanagari with virama: क्‍ष क्ष", "Tamil: வணக்கம் உலகம்",
    "Amharic: ሰላም ዓለም", "Mongolian: ᠮᠣᠩᠭᠣᠯ\u180eᠪᠢᠴᠢᠭ", "Khmer: សួស្តីពិភពលោក", "Sinhala: ආයුබෝවන්",
]
EMOJI = ["😀", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸🇬🇧", "❤️", "1️⃣", "#️⃣", "🧑🏿‍🚀", "🤷‍♀️",
         "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "✌🏻", "🫠", "☃", "♥", "★☆", "→←↑↓", "∑∫√∞≈≠",
         "𝕳𝖊𝖑𝖑𝖔", "𝟘𝟙𝟚", "ℌℑℜ", "①②③", "Ⅻ", "½¾", "²³", "🀄", "🎉🎉🎉"]


def scripts_and_emoji(rng, n):
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 5)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(SCRIPTS))
            elif r < 0.85:
                parts.append("".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(["and", "OK!", "x=1", "(see)", "42", "—", "…"]))
        out.append(rng.choice([" ", "", "\n", "  "]).join(parts))
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
WS = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", "\u00a0", "\u00a0\u00a0",
      "\u3000", "\u2003", "\u2009", "\u202f", "\u205f", "\u2028", "\u2029", "\u0085", "\u180e", "\u200b",
      "\ufeff", "\x0b", "\x0c", " \n ", "\t \n", " \r\n", "\n ", "  \n\n  ", "\u1680", "\u2000\u200a"]


def numbers_ws(rng, n):
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 60))))
        elif r < 0.4:
            out.append(rng.choice(["٠١٢٣٤٥٦٧٨٩", "０１２３４５", "१२३४", "๑๒๓", "3.14159265358979", "1e-10", "0xDEADBEEF",
                                   "1,000,000", "12:30:45", "v1.2.3", "-0.0", "+42", "1_000_000", "²³¹", "ⅠⅡⅢ", "⑴⑵"]))
        elif r < 0.75:
            out.append("".join(rng.choice(WS) for _ in range(rng.randint(1, 6))))
        else:
            out.append(rng.choice(["word", "Word", "x", "a1b2c3", "foo_bar", "END", "中文", "ﾃｽﾄ", "!!!", "?.", "'s", "'LL"]))
    return "".join(out) + "\n"


# ----------------------------------------------------------------------------
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>",
            "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>", "<｜▁pad▁｜>", "<｜place▁holder▁no▁7｜>",
            "<｜place▁holder▁no▁77｜>", "<｜begin▁of▁sentence", "｜>", "<｜User", "<｜user｜>", "<|User|>", "<<｜User｜>>"]
DSML = ['<｜DSML｜tool_calls>', '</｜DSML｜tool_calls>', '<｜DSML｜invoke name="x">', '<｜DSML｜invoke name="get_weather">',
        '</｜DSML｜invoke>', '<｜DSML｜parameter name="a" string="true">', '<｜DSML｜parameter name="count" string="false">',
        '</｜DSML｜parameter>']


def specials(rng, n):
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            user = rng.choice(["What is 2+2?", "天气怎么样？", "Write a haiku.", "Call the tool please.", "안녕"])
            think = rng.choice(["", "The user asks something simple.", "需要调用工具。"])
            out.append(f"<｜begin▁of▁sentence｜>You are helpful.<｜User｜>{user}<｜Assistant｜><think>{think}</think>"
                       f"{rng.choice(['4', 'Sunny.', 'OK'])}<｜end▁of▁sentence｜>")
        elif r < 0.65:
            val = rng.choice(['Paris', '42', 'a "quoted" value', '多伦多', 'line1\nline2'])
            out.append(f'{DSML[0]}\n{DSML[3]}\n<｜DSML｜parameter name="city" string="true">{val}{DSML[7]}\n'
                       f'{DSML[6]}{rng.randint(0, 999)}{DSML[7]}\n{DSML[4]}\n{DSML[1]}')
        else:
            out.append("".join(rng.choice(SPECIALS + DSML + [" ", "text", "\n", "x<", ">y", "｜", "▁"])
                               for _ in range(rng.randint(2, 10))))
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
RANGES = [(0x20, 0x7e), (0xa0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff), (0x590, 0x5ff), (0x600, 0x6ff), (0x900, 0x97f),
          (0xe00, 0xe7f), (0x1100, 0x11ff), (0x2000, 0x206f), (0x2190, 0x22ff), (0x3000, 0x30ff), (0x4e00, 0x9fa5),
          (0xac00, 0xd7a3), (0xff00, 0xffef), (0x1f300, 0x1f64f), (0x1f900, 0x1f9ff), (0x300, 0x36f)]


def random_unicode(rng, n_chars):
    out = []
    for _ in range(n_chars):
        lo, hi = rng.choice(RANGES)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.1:
            out.append(rng.choice([" ", "\n", "a", "1"]))
    return "".join(out) + "\n"


def long_runs(rng):
    parts = ["a" * 3000, " ", "ab" * 1500, "\n", " " * 2000, "x", "\t" * 500, "\n" * 300, "9" * 4000, " ",
             "中" * 1500, " ", "😀" * 500, "\r\n" * 200, "-" * 1000, "=" * 999, "_" * 777, ".", "é" * 800,
             "Supercalifragilisticexpialidocious" * 40, " " * 5 + "\n" * 5 + " " * 5, "\u00a0" * 100]
    rng.shuffle(parts)
    return "".join(parts) + "\n"


CASES = ["", " ", "  ", "\n", "\r\n", "\r", "\t", "a", "A", "0", "12", "123", "1234", "12345678901234567890",
         "hello", " hello", "hello ", "hello  world", "hello\nworld", "hello\r\nworld", "hello \n world",
         "I'm", "don't", "THEY'LL", "it's-a me", "$100", "#tag", "@user", "a.b.c", ".hidden", "...", "?!?!",
         "(x)", "[1, 2]", "{a: b}", "x\u00a0y", "x\u3000y", "x\u2028y", "x\u0085y", "x\u180ey", "x\u200by",
         "x\ufeffy", "e\u0301", "\u0301", "a\u0301\u0302\u0303", "é", "中文", "中文abc", "abc中文", "ひらがな",
         "カタカナ", "ｶﾀｶﾅ", "한국어", "مرحبا", "שלום", "👍🏽", "👩‍💻", "🇯🇵", "❤️", "1️⃣", "½", "²", "Ⅻ",
         "<｜begin▁of▁sentence｜>", "<｜begin▁of▁sentence｜>hi", "x<｜User｜>y", "<｜User｜><｜Assistant｜>",
         "<think>\n</think>", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f",
         "<|EOT|>", "<｜▁pad▁｜>", "<｜fim▁hole｜>", "<｜DSML｜tool_calls>", '<｜DSML｜invoke name="x">',
         '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>', "｜", "▁", "<｜", "｜>",
         "   leading", "trailing   ", "\n\n\nx", "x\n\n\n", " \n", "\n ", "\t\n\t", "a\tb", "a\x0bb", "a\x0cb",
         "\u00a0", "\u00a0\u00a0x", "0.5", "-1", "1e10", "3,141", "٣٤٥", "１２３４", "𝟘𝟙𝟚𝟛", "a1", "1a",
         "'s", "'S", " 's", "''", "\"\"", "a--b", "a__b", "::", "->", "=>", "!=", "&&", "||", "</s>", "<s>",
         "\\n", "\\\\", "%d", "{{x}}", "` `", "~~~", "```python\nprint(1)\n```"]


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(20240501)
    files = {
        "english": english(rng, 420),
        "code": code(rng, 260),
        "cjk": cjk(rng, 520),
        "scripts_emoji": scripts_and_emoji(rng, 420),
        "numbers_whitespace": numbers_ws(rng, 3000),
        "special_dsml": specials(rng, 400),
        "random_unicode": random_unicode(rng, 12000),
        "long_runs": long_runs(rng),
    }
    total = 0
    for name, text in files.items():
        data = text.encode("utf-8")
        total += len(data)
        with open(os.path.join(OUT, name + ".txt"), "wb") as f:
            f.write(data)
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(CASES, f, ensure_ascii=False, indent=0)
        f.write("\n")
    # Decode cases: ids are drawn from the whole id space (model + added tokens);
    # byte tokens (ids whose text is a lone UTF-8 lead/continuation byte) are
    # over-represented so invalid / split UTF-8 is exercised.
    drng = random.Random(7)
    dec = []
    for i in range(300):
        n = drng.randint(0, 40)
        ids = []
        for _ in range(n):
            r = drng.random()
            if r < 0.3:
                ids.append(drng.randint(0, 255))  # mostly single-byte tokens in the DeepSeek vocab
            elif r < 0.4:
                ids.append(drng.randint(128000, 128814))
            else:
                ids.append(drng.randint(0, 127999))
        dec.append(ids)
    with open(os.path.join(OUT, "decode_cases.json"), "w") as f:
        json.dump(dec, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(files)} corpus files, {total} bytes, {len(CASES)} cases, {len(dec)} decode cases to {OUT}")


if __name__ == "__main__":
    main()
