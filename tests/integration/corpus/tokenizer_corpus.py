"""Tokenizer test corpus: hand-written samples in many scripts and shapes, plus seeded random mixes.

Written for this project (no external data). Every character is from Unicode 13 or older, so the
regex and normalization tables of every implementation involved agree on it.
Run as a script to print the corpus as JSON lines, or with --mixed/--unique/--long BYTES to print
about that many bytes of text for benchmarks (see bench_text).
"""

import json
import random
import sys

ENGLISH = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll agree: it's what we've wanted, isn't it? They'd say so.",
    "SHOUTING CONTRACTIONS: I'M, YOU'LL, WE'VE, THEY'D, IT'S, DON'T",
    "Mixed case: I'Ll wE'Ve iT'S",
    "Tokenizers split text into words, numbers and punctuation before merging byte pairs.",
    "  Leading spaces and trailing spaces  ",
    "e-mail: someone@example.com, web: https://example.org/path?q=1&r=two#frag",
    "Quotes: \"double\", 'single', `backtick`, “curly”, ‘curly’, «guillemets»",
    "Dashes – en, — em, and ellipsis…",
    "Contractions with a long s: it'\u017f and a Kelvin sign: we'\u212a",
    "Caseless traps: it'\u017ftop, we'\u212aelvin, I'\u212aLL, you'\u017fS",
    "Ms. O'Neil's cat isn't Mr. D'Arcy's.",
    "#hashtag @mention $dollar %percent ^caret &and *star",
    "(parentheses) [brackets] {braces} <angles>",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier SCREAMING_SNAKE",
    "A sentence.Another sentence!And a third?No spaces.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
]

EUROPEAN = [
    "Grüße aus München! Die Straße ist schön, Äpfel und Öl im Übermaß.",
    "GROSSBUCHSTABEN MIT ẞ: STRAẞE",
    "Donaudampfschifffahrtsgesellschaftskapitänsmützenabzeichen",
    "Ich hab's gesehen, wie's geht.",
    "Français : où est l'hôtel ? C'est là-bas, près de l'église.",
    "Español: ¿Dónde está la biblioteca? ¡Allí!",
    "Português: ação, coração, pães",
    "Polski: Zażółć gęślą jaźń.",
    "Türkçe: İstanbul, ışık, ğağ",
    "Čeština: Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Tiếng Việt: Xin chào, tôi tên là Nguyễn.",
    "Русский: Съешь же ещё этих мягких французских булок.",
    "Українська: ґанок, їжак, єнот",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "Norsk: blåbærsyltetøy, ÆØÅ",
    "Magyar: árvíztűrő tükörfúrógép",
]

ASIAN = [
    "今天天气很好，我们去公园散步吧。",
    "這是繁體中文的句子，包含標點符號：「引號」。",
    "中文English混合mixed文本text123数字",
    "日本語の文章です。ひらがな、カタカナ、漢字。",
    "半角カナ: ｶﾀｶﾅ ﾊﾟﾋﾟ",
    "全角英数：ＡＢＣ１２３！",
    "한국어 문장입니다. 안녕하세요!",
    "\u1100\u1161\u11a8 \u1102\u1165 \u1112\u1161\u11ab",  # conjoining jamo: NFC composes them
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "ລາວ: ສະບາຍດີ",
    "ខ្មែរ: សួស្តី",
    "မြန်မာ: မင်္ဂလာပါ",
    "हिन्दी: नमस्ते, आप कैसे हैं? क्षत्रिय",
    "क़ ख़ ग़",  # nukta letters that NFC keeps decomposed
    "परीक्षा १२३ ०",
    "বাংলা: আমি ভালো আছি।",
    "\u09c7\u09be \u09cb",  # Bengali vowel sign pieces that NFC composes
    "தமிழ்: வணக்கம்",
    "తెలుగు ಕನ್ನಡ മലയാളം",
    "ਪੰਜਾਬੀ ગુજરાતી",
]

MIDDLE_EAST_AFRICA = [
    "العربية: مرحبا بكم في عالم البرمجة.",
    "مُحَمَّدٌ رَسُولُ",  # with harakat
    "الأرقام: ٠١٢٣٤٥٦٧٨٩",
    "فارسی: سلام، حال شما چطور است؟ ۱۲۳",
    "اردو: یہ ایک جملہ ہے۔",
    "עברית: שלום עולם",
    "בְּרֵאשִׁית",  # niqqud, reordered by NFC
    "RTL marks: \u200fabc\u200e \u202bembedded\u202c",
    "አማርኛ: ሰላም ነህ",
    "ქართული հայերեն",
    "Kiswahili: Habari za asubuhi? Nzuri sana.",
]

EMOJI = [
    "😀😃😄😁",
    "Family: 👨\u200d👩\u200d👧\u200d👦 done",
    "👩\u200d💻🧑\u200d🚀🏳️\u200d🌈🏴\u200d☠️",
    "Skin tones: 👍🏻 👍🏽 👍🏿",
    "Flags: 🇩🇪🇯🇵🇺🇸🇧🇷",
    "Keycaps: 1\ufe0f\u20e3 #\ufe0f\u20e3 *\ufe0f\u20e3",
    "Hearts ❤️ ❤ 🧡💛💚",
    "👨🏾\u200d❤️\u200d💋\u200d👨🏻",
    "Text with emoji🚀in the middle🎉and end👋",
    "Symbols: ☀☁☂☃ ☺ ★☆ ♠♣♥♦ ♪♫",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ 1 ∧ ¬P ⇒ Q, ∫₀¹ f(x) dx ≈ π",
]

NFC_CHANGES = [
    "cafe\u0301 na\u0308ive re\u0301sume\u0301",
    "A\u030angstro\u0308m \u212b \u2126hm",
    "o\u0302\u0323 vs o\u0323\u0302",  # canonical reordering of marks
    "\u1e9b\u0323",
    "n\u0303 N\u0303 u\u0308 U\u0308",
    "e\u0301\u0301\u0301 stacked",
    "\u0041\u030a\u0301 A with two marks",
    "\u2000\u2001 singleton spaces",
    "\u0958 \u0959 \u095a",  # Devanagari composition exclusions
    "\ufb01 ligature (NFC keeps it)",
    "\u00c5 \u212b \u0041\u030a",
    "\u03a9 \u2126 \u1f7b \u03cd",
    "\u0e40\u0e01\u0e4d\u0e32",
    "\u1112\u1161\u11ab\u1100\u1173\u11af",
    "\u0301 leading combining mark",
    "combining at end\u0301",
    "\u0300\u0301\u0302\u0303\u0304",
]

CODE = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "const add = (a, b) => a + b;\nconsole.log(add(1, 2)); // 3",
    '{"name": "xprec", "version": "0.1.0", "tags": ["a", "b"], "nested": {"x": 1.5e-3}}',
    "<html>\n  <body class=\"main\">\n    <p>Hello &amp; welcome</p>\n  </body>\n</html>",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "for f in *.txt; do echo \"$f\" | sed -e 's/a/b/g' >> out.log; done",
    "fn main() -> Result<(), Box<dyn Error>> {\n"
    "    let v: Vec<u32> = (0..10).collect();\n    Ok(())\n}",
    "regex = r'^(?:[a-z0-9!#$%&*+/=?^_`{|}~-]+)@\\w+\\.\\w{2,}$'",
    "    \t  mixed indentation\n\t\t\ttabs",
    "x=1;y=2;z=x+y;print(z)",
    "if (a != b && c <= d || !e) { return -1; } else if (f >= g) { x++; }",
    "matrix = [[1, 2, 3],\n          [4, 5, 6],\n          [7, 8, 9]]",
    "# Heading\n\n- item one\n- item two\n\n```python\nprint('hi')\n```\n",
    "\\begin{equation} E = mc^2 \\end{equation}",
    "git commit -m \"Fix: handle \\r\\n line endings\" && git push origin main",
    "// 注释: 中文注释\nlet 变量 = 1;",
]

NUMBERS = [
    "1234567890",
    "3.14159265358979323846",
    "1,000,000.00 and 1.000.000,00",
    "Call 555-0123 at 12:30 on 2024-01-01T12:30:00Z",
    "0x1F 0b1010 0o777 1e-10 -42 +7",
    "Version 1.2.3-beta.4+build.567",
    "IPv4 192.168.0.1, IPv6 fe80::1ff:fe23:4567:890a",
    "²³¹ ¼½¾ ⅠⅡⅢⅫ ①②③",
    "１２３４５",
    "०१२ ০১২ ๐๑๒",
    "99 bottles, 100%, $5.99, €10, £20, ¥300",
    "123abc456def789",
]

WHITESPACE = [
    " ",
    "  ",
    "    ",
    "\t",
    "\n",
    "\n\n",
    "\n\n\n\n",
    "\r\n",
    "\r\n\r\n",
    "\r",
    "line one\r\nline two\r\nline three\r\n",
    "a\n\nb\n\n\nc",
    "word  \n  word",
    "  \n  \n  ",
    " \t \t ",
    "trailing\n",
    "\ntrailing and leading\n",
    "tab\tseparated\tvalues\t1\t2",
    "non-breaking\u00a0space and\u3000ideographic space and\u2003em space",
    "byte order mark \ufeffinside and \ufeff\ufeff twice",
    "next line \u0085 char and mongolian \u180e separator",
    "line\u2028separator and paragraph\u2029separator",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "\u00a0\u00a0 leading nbsp",
    "ends with spaces   ",
    "\x0b vertical tab \x0c form feed",
    "control \x01\x02\x03 chars \x7f del",
    "a \n b \r\n c \r d",
    "  \r\n",
    "!!!\n\n???",
]

SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<tool_response>ok</tool_response>",
    "<|im_start|><|im_end|><|endoftext|>",
    "<<|im_end|>>",
    "<|im_start",
    "im_end|>",
    "< |im_end| >",
    "<|IM_END|>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|>",
    "<|repo_name|>xprec<|file_sep|>main.c",
    "  <|im_end|>  spaces around",
    "\n<|im_start|>\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|box_start|>(1,2),(3,4)<|box_end|>",
    "<think></think>",
    "<|endoftext|><|endoftext|>",
    "a<|im_end|>b<|im_start|>c",
    "中文<|im_end|>中文",
    "<|<|im_end|>|>",
    "<|object_ref_start|>cat<|object_ref_end|>",
]

LONG = [
    "a" * 1000,
    "supercalifragilisticexpialidocious" * 30,
    "1234567890" * 50,
    "中" * 400,
    "漢字かな交じり文" * 60,
    "😀" * 200,
    "👨\u200d👩\u200d👧" * 50,
    " " * 500,
    "\n" * 300,
    "!" * 600,
    "-=" * 300,
    "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCBkYXRh" * 20,
    "https://example.com/" + "very/long/path/segment/" * 40,
    "العربية" * 100,
    "नमस्ते" * 100,
    "e\u0301" * 300,
    "ab " * 400,
    "x" * 5000,
]

# Pools for the random mixes, by script or kind.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "     \t\n\n\r\n",
    "äöüßéèêçñåøłżıİế",
    "\u0300\u0301\u0302\u0303\u0308\u030a\u0323\u0327",
    "的一是不了人我在有他这中大来上国",
    "あいうえおカキクケコー。、",
    "한국어문장\u1100\u1161\u11a8",
    "العربيةَُِ٠١",
    "हिन्दीक़१२",
    "абвгдеёЖЯαβγΩ",
    "😀👍🏽\u200d\ufe0f❤🇩🇪👨👩",
    "\u00a0\u3000\u2003\ufeff\u200b\u2028\u0085",
]
SPECIAL_POOL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>"]


def random_mix(rng, length):
    pools = rng.sample(POOLS, rng.randint(1, 4))
    out = []
    while len(out) < length:
        if rng.random() < 0.03:
            out.append(rng.choice(SPECIAL_POOL))
        else:
            pool = rng.choice(pools)
            out.append(pool[rng.randrange(len(pool))] * rng.choice([1, 1, 1, 2, 3]))
    return "".join(out)


def build_corpus():
    """The test corpus: at least 300 distinct strings, the empty string among them."""
    base = (ENGLISH + EUROPEAN + ASIAN + MIDDLE_EAST_AFRICA + EMOJI + NFC_CHANGES + CODE + NUMBERS
            + WHITESPACE + SPECIAL + LONG)
    corpus = [""] + base
    # the same samples in other surroundings: after a space, joined by newlines, upper-cased
    corpus += [" " + s for s in ENGLISH + EUROPEAN[:6] + ASIAN[:4] + NUMBERS[:4]]
    corpus += ["\n".join(pair) for pair in zip(EUROPEAN, ASIAN + MIDDLE_EAST_AFRICA)]
    corpus += [s.upper() for s in ENGLISH[:8] + EUROPEAN[:8]]
    rng = random.Random(20240607)
    corpus += [random_mix(rng, rng.randint(1, 120)) for _ in range(160)]
    seen = set()
    return [s for s in corpus if not (s in seen or seen.add(s))]


def bench_text(kind, size, seed=7):
    """About `size` bytes of documents separated by blank lines, for throughput measurements:
    "mixed": the corpus samples (all scripts, code, numbers, whitespace, special tokens) with one
             document in ten a random mix and the long words once each;
    "unique": random mixes only, so nearly every word is new (the word caches cannot help);
    "long": the long words only (each one a single BPE word of hundreds of bytes)."""
    rng = random.Random(seed)
    natural = [s for s in build_corpus() if s not in LONG]
    parts = list(LONG) if kind == "mixed" else []
    total = sum(len(s.encode()) + 2 for s in parts)
    while total < size:
        if kind == "long":
            s = rng.choice(LONG)
        elif kind == "unique" or rng.random() < 0.1:
            s = random_mix(rng, rng.randint(50, 400))
        else:
            s = rng.choice(natural)
        parts.append(s)
        total += len(s.encode()) + 2
    rng.shuffle(parts)
    return "\n\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--mixed", "--unique", "--long"):
        sys.stdout.write(bench_text(sys.argv[1][2:], int(sys.argv[2])))
    else:
        for s in build_corpus():
            print(json.dumps(s, ensure_ascii=False))
