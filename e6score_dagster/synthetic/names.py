"""Names and free text: pseudo-words, tag names, descriptions, sources (the CSV quirks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED_NAMES: dict[int, tuple[str, ...]] = {
    cat: tuple(names.split())
    for cat, names in {
        0: "anthro male female solo fur hair clothing smile tail open_mouth looking_at_viewer "
        "simple_background white_background text duo blush standing feral eyes_closed teeth "
        "tongue group english_text dialogue outside sitting :3 <3 ... 2_tails",
        1: "unknown_artist conditional_dnp anonymous_artist third-party_edit",
        3: "nintendo pokemon my_little_pony sonic_the_hedgehog_(series) disney star_fox "
        "zootopia undertale_(series)",
        4: "fan_character pikachu krystal_(star_fox) nick_wilde judy_hopps sonic_the_hedgehog "
        "rainbow_dash_(mlp)",
        5: "mammal canid canine felid feline fox wolf dragon equid domestic_dog avian bird "
        "reptile scalie lagomorph",
        7: "hi_res absurd_res digital_media_(artwork) animated comic sketch 2021 2022 2023 16:9 "
        "4k sound low_res alpha_channel",
        8: "male_(lore) female_(lore) trans_woman_(lore) gay_(lore)",
    }.items()
}  # well-known names take the top popularity ranks of their category
NAME_SUFFIXES: dict[int, tuple[tuple[str, ...], float]] = {
    0: (("_(object)", "_(action)"), 0.02),
    1: (("_(artist)",), 0.06),
    3: (("_(series)", "_(franchise)", "_(game)"), 0.3),
    4: (("_(character)",), 0.3),
    5: (("_(species)",), 0.1),
    7: (("_(artwork)", "_(meta)"), 0.3),
    8: (("_(lore)",), 1.0),
}

_CONSONANTS = "b c d f g h j k l m n p r s t v w z br ch cr dr fl gr kr pl sh sk st th tr"
_ONSETS = ("", *_CONSONANTS.split(" "))
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "oo", "ou", "y")
_CODAS = ("", "", "n", "r", "s", "t", "l", "x", "ck", "ng", "rd", "m")

_EMOJI = ("🦊", "🐺", "✨", "❤️", "😂", "🔥", "👀", "🐉", "🌈", "💜", "👨‍👩‍👧", "🏳️‍🌈", "🙏🏽")
_FOREIGN = (
    "日本語の説明です。",
    "狐の絵",
    "커미션 감사합니다",
    "Спасибо за просмотр!",
    "¡Gracias por ver!",
    "Ça marche, café crème",
    "naïve façade",
    "Zürich: ö ä ü ß",
    "مرحبا بالجميع",
    "שלום",
    "ελληνικά",
    "Ñandú",
    "ありがとう〜",
    "中文描述，带逗号",
    "Tiếng Việt",
    "ḡ̸̛l̵̨i̷̢t̶c̵h̴",
)
_FREE_SOURCES = (
    "Commissioned by a friend, thanks!",
    "Drawn by me, 2012",
    "my sketchbook 📓",
    "Twitter (deleted)",
    "https://www.pixiv.net/ 作品",
    'from the "Winter" set',
)
_URL_TEMPLATES: tuple[tuple[str, bool, str, str], ...] = (
    # prefix, uses a user name, middle, suffix; the number goes between middle and suffix
    ("https://www.furaffinity.net/view/", False, "", "/"),
    ("https://twitter.com/", True, "/status/", ""),
    ("https://x.com/", True, "/status/", ""),
    ("https://www.deviantart.com/", True, "/art/Piece-", ""),
    ("https://inkbunny.net/s/", False, "", ""),
    ("https://www.pixiv.net/en/artworks/", False, "", ""),
    ("https://", True, ".tumblr.com/post/", ""),
    ("https://www.patreon.com/posts/", True, "-", ""),
    ("https://d.furaffinity.net/art/", True, "/", ".png"),
)
STR = np.dtypes.StringDType()


@dataclass(frozen=True)
class TextPools:
    """Pre-built free text, drawn by index so the bulk of the work stays vectorised."""

    words: np.ndarray  # StringDType pseudo-words
    descriptions: np.ndarray  # object[str]
    pool_descriptions: np.ndarray  # object[str]


def pseudo_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pronounceable lowercase words, unique, as a StringDType array."""
    syllables = np.array([o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS], STR)
    syllables = np.unique(syllables)
    out = np.empty(0, STR)
    while out.size < n:
        m = 2 * n
        k = rng.choice(3, size=m, p=(0.4, 0.5, 0.1)) + 1
        word = syllables[rng.integers(0, syllables.size, m)]
        for extra in (2, 3):
            more = syllables[rng.integers(0, syllables.size, m)]
            word = np.where(k >= extra, np.strings.add(word, more), word)
        word = word[np.strings.str_len(word) >= 3]
        out = np.concatenate([out, word])
        _, first = np.unique(out, return_index=True)
        out = out[np.sort(first)]
    return out[:n]


ALL_SUFFIXES = ("", *dict.fromkeys(x for sufs, _ in NAME_SUFFIXES.values() for x in sufs))


def candidate_keys(rng: np.random.Generator, n_words: int, cat: int, n: int) -> np.ndarray:
    """Names as integer codes (word, word, word, suffix), so de-duplication is a cheap sort.

    Words hold no `_` and suffixes start with `_(`, so equal codes <=> equal strings.
    """
    base = n_words + 1  # word code 0 = absent
    parts = rng.choice(3, size=n, p=(0.25, 0.55, 0.2)) + 1
    w = rng.integers(0, n_words, (3, n)) + 1
    w[1, parts < 2] = 0
    w[2, parts < 3] = 0
    suffixes, share = NAME_SUFFIXES[cat]
    codes = np.array([ALL_SUFFIXES.index(x) for x in suffixes])
    suffix = np.where(rng.random(n) < share, codes[rng.integers(0, codes.size, n)], 0)
    return ((w[0] * base + w[1]) * base + w[2]) * len(ALL_SUFFIXES) + suffix


def key_names(keys: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Decode _candidate_keys codes into `word_word_(suffix)` strings (object array)."""
    base = words.size + 1
    suffix = keys % len(ALL_SUFFIXES)
    rest = keys // len(ALL_SUFFIXES)
    w2, rest = rest % base, rest // base
    w1, w0 = rest % base, rest // base
    plain = np.concatenate([[""], words.astype(object)])
    joined = np.concatenate([[""], "_" + words.astype(object)])
    return plain[w0] + joined[w1] + joined[w2] + np.array(ALL_SUFFIXES, dtype=object)[suffix]


def _sentence(rng: np.random.Generator, words: np.ndarray) -> str:
    picked = [str(w) for w in words[rng.integers(0, words.size, rng.integers(3, 12))]]
    for i in range(1, len(picked)):
        if rng.random() < 0.15:
            picked[i - 1] += ","
    picked[0] = picked[0].capitalize()
    return " ".join(picked) + str(rng.choice([".", "!", "?", "...", " :3"]))


def _description(rng: np.random.Generator, words: np.ndarray) -> str:
    """One description with the quirks that break naive CSV readers."""
    parts = [_sentence(rng, words) for _ in range(rng.integers(1, 4))]
    roll = rng.random(8)
    if roll[0] < 0.3:
        parts.append(f'He said "{_sentence(rng, words)}" and left')
    if roll[1] < 0.25:
        parts.insert(0, f"[b]{_sentence(rng, words)}[/b]")
    if roll[2] < 0.25:
        parts.append(str(rng.choice(_EMOJI)) * int(rng.integers(1, 4)))
    if roll[3] < 0.25:
        parts.append(str(rng.choice(_FOREIGN)))
    if roll[4] < 0.15:
        parts.append(f"Commissioned, see https://example.org/{rng.integers(1, 10**6)}?a=1,b=2")
    if roll[5] < 0.05:
        parts.insert(0, '"Quoted opening," she wrote')
    if roll[6] < 0.05:
        parts.append("N/A\tpath\\to\\file")
    sep = str(rng.choice(["\n", "\r\n", "\n\n", " ", " "]))
    text = sep.join(parts)
    return text[:500].removesuffix("\r")  # a bare CR would not be quoted by csv


def build_text_pools(seed: int) -> TextPools:
    """Small per-seed pools of descriptions; the posts draw from them by index."""
    rng = np.random.default_rng([seed, 1])
    words = pseudo_words(rng, 4000)
    descriptions = [_description(rng, words) for _ in range(3000)]
    pool_desc = [_description(rng, words) for _ in range(500)]
    return TextPools(
        words=words,
        descriptions=np.array(descriptions, dtype=object),
        pool_descriptions=np.array(pool_desc, dtype=object),
    )


def _urls(rng: np.random.Generator, words: np.ndarray, n: int) -> np.ndarray:
    """One plausible source URL per row, vectorised over templates."""
    t = rng.integers(0, len(_URL_TEMPLATES), n)
    pick = np.array([[p, m, s] for p, _, m, s in _URL_TEMPLATES], STR)[t]
    uses_user = np.array([u for _, u, _, _ in _URL_TEMPLATES])[t]
    user = np.where(uses_user, words[rng.integers(0, words.size, n)], "")
    num = rng.integers(10**5, 10**12, n).astype(STR)
    url = np.strings.add(np.strings.add(pick[:, 0], user), pick[:, 1])
    return np.strings.add(np.strings.add(url, num), pick[:, 2])


def sources(rng: np.random.Generator, words: np.ndarray, n: int) -> list[str]:
    """Empty, one URL, or several URLs separated by newlines (quoted multi-line fields)."""
    k = rng.choice(4, size=n, p=(0.25, 0.45, 0.22, 0.08))
    out = _urls(rng, words, n)
    for extra in (2, 3):
        more = np.strings.add("\n", _urls(rng, words, n))
        out = np.where(k >= extra, np.strings.add(out, more), out)
    free = np.array(_FREE_SOURCES, STR)[rng.integers(0, len(_FREE_SOURCES), n)]
    out = np.where(rng.random(n) < 0.01, free, out)
    return np.where(k == 0, "", out).tolist()
