"""Tests for umg_jax.data.tokenizer against open_clip's SimpleTokenizer (the OpenAI CLIP algorithm).

Two references: open_clip itself (needs torch; skipped without it), and ids generated once from
open_clip and stored in tests/data/tokenizer_reference.json (always run). Regenerate the file with
``python tests/test_tokenizer.py`` after changing CORPUS.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import re
import unicodedata

import numpy as np
import pytest

from umg_jax.data import tokenizer as tk

REFERENCE_PATH = os.path.join(os.path.dirname(__file__), "data", "tokenizer_reference.json")

_LONG = ("a very long caption that keeps going and going " * 12).strip()

CORPUS = [
    # plain
    "a photo of a cat",
    "A Photo Of A Dog.",
    "two people riding bicycles down a busy city street next to parked cars",
    # punctuation, contractions, symbols, numbers
    "Hello, world! What's up? I'm fine; you'll see -- it's (really) [fine]...",
    "DON'T SHOUT, it'S ok; THEY'LL, we'VE, she'D",
    "e-mail: john.doe@example.com, url: https://www.example.org/path?q=1&x=2",
    "3.14159 is pi; 1,000,000 dollars; 2023-11-24 12:30pm; #1 @home 50%",
    "x^2 + y_1 = z*3 / 4 ~ `code` | \\ {braces} <angle>",
    # accents, composed and decomposed (NFC), ligatures, widths, curly quotes
    "café naïve résumé Straße Ångström ñandú",
    "cafe\u0301 nai\u0308ve",
    "the ﬁrst ﬂight of ĳssel ǆungla",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ　１２３！ and ｶﾀｶﾅ",
    "\u201cquoted\u201d and \u2018single\u2019 it\u2019s a dog\u2019s life \u201ehere\u201f",
    # other scripts and emoji
    "Ελληνικά κείμενα, русский текст, עברית, العربية",
    "हिन्दी पाठ और বাংলা",
    "日本語のテキストと中文文本和한국어",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷 heart ❤️ keycap 1️⃣",
    "numbers ½ ² Ⅻ ٣ ३ ① 10³",
    # HTML entities (nested, numeric, named; a literal '<' disables ftfy's own pass)
    "fish &amp; chips &lt;b&gt; &quot;hi&quot; &#39;quoted&#39; &#x263A; &nbsp;space &copy;",
    "double &amp;amp; escaped &amp;lt;tag&amp;gt;",
    "a < b &amp; c > d",
    "a &amp; b\nx < y &amp;amp;\n&amp;amp; z",  # ftfy stops decoding from the first '<' line on
    "&amp &AMP; &EACUTE; &eacute; &not that &notit; &#9999999; &#x41; &eACUTE;",
    "P&EACUTE;REZ BUNDESSTRA&SZLIG;E &NTILDE; &nTILDE;",
    # control characters, C1 controls, ANSI escapes, BOM, odd whitespace
    "tab\tnew\nline\r\ncarriage\u2028sep\u00a0nbsp\u3000ideo",
    "\ufeffbom \x1b[31mred\x1b[0m \x00nul \x85ellipsis \x96dash \u200bzw",
    "lone surrogate pair \ud83d\ude00 ok",
    "\x80\x81\x8d\x9f c1 controls, soft\xadhyphen",
    "\U0001d173 music, wales 🏴\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f,"
    " x\u2063y \u202ertl",
    "İstanbul ıi ǅ ß ẞ ﬅ ΐ ǰ ẛ̣",
    # special-token text, case-folded literals, combining ypogegrammeni
    "<start_of_text> inside <end_of_text> text <START_OF_TEXT>",
    "long s: it'ſ \u0345 alone and ᾳ composed",
    # long (> 77 tokens), empty, whitespace-only
    _LONG,
    "",
    "   \t\n  ",
    "a",
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
]

# Mojibake that ftfy's fix_encoding repairs and we do not (documented divergence).
MOJIBAKE = ["sÃ³ pÃ¡gina", "â€œquotedâ€\x9d", "cafÃ©"]

CONTEXTS = (77, 32)


def _open_clip(torch_mod):
    """open_clip's tokenizer for ViT-B-32 (SimpleTokenizer, 'lower' cleaning, full ftfy)."""
    del torch_mod  # only needed for the torchvision shim, applied by the fixture
    open_clip = pytest.importorskip("open_clip")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    assert type(tokenizer).__name__ == "SimpleTokenizer"
    return tokenizer


def _fuzz_corpus(n: int, seed: int = 0) -> list[str]:
    """Random strings over a mixed alphabet (every script / fixer path of CORPUS)."""
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3
        + list(" \t\n.,;:!?'\"-_()[]{}<>/@#$%^&*+=~`|\\")
        + list("éüñçøåßœæÉÜÑαβγδΩσςабвгдЖ日本語中文字한국어‘’“”„ﬁﬂﬀĳǆＡＢｃ１２！　ｶﾞ½²Ⅻ٣३")
        + ["😀", "👍🏽", "👨\u200d👩\u200d👧", "❤️", "🇫🇷", "\u0301", "\u0308", "\u0345", "ſ", "K",
           "\x85", "\x96", "\x1b[31m", "\u200b", "\ufeff", "\xa0", "&amp;", "&lt;", "&#39;",
           "&quot;", "&nbsp;", "&amp;amp;", "&EACUTE;", "&#x41;", "'s", "'S", "'ll", "'ſ",
           "<start_of_text>", "<END_OF_TEXT>", "हिन्दी", "مرحبا", "\ud83d\ude00", "\u2028", "\r\n"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def _reference() -> dict:
    with open(REFERENCE_PATH, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# Stored reference (no torch needed)
# ------------------------------------------------------------------------------------------------


def test_stored_reference_matches():
    ref = _reference()
    texts = [t.encode("ascii").decode("unicode_escape") for t in ref["texts_escaped"]]
    assert texts == CORPUS, "CORPUS changed: regenerate with python tests/test_tokenizer.py"
    tok = tk.get_tokenizer()
    for i, text in enumerate(CORPUS):
        assert tok.encode(text) == ref["encode"][i], repr(text)
    for length in CONTEXTS:
        np.testing.assert_array_equal(tok(CORPUS, context_length=length),
                                      np.asarray(ref[f"ctx{length}"], np.int32))


def test_stored_reference_is_nontrivial():
    # Guards the reference itself: truncation, padding and non-ASCII paths all occur in it.
    ref = _reference()
    rows = np.asarray(ref["ctx77"])
    long_row = rows[CORPUS.index(_LONG)]
    assert len(ref["encode"][CORPUS.index(_LONG)]) > 77
    assert long_row[0] == tk.SOT_ID and long_row[-1] == tk.EOT_ID and (long_row != 0).all()
    np.testing.assert_array_equal(rows[CORPUS.index("")][:3], [tk.SOT_ID, tk.EOT_ID, 0])
    assert max(max(ids, default=0) for ids in ref["encode"]) > 40000
    assert ref["decode"][0] == "<start_of_text>a photo of a cat <end_of_text>"


# ------------------------------------------------------------------------------------------------
# Live open_clip parity
# ------------------------------------------------------------------------------------------------


def test_matches_open_clip_corpus(torch_mod):
    ref = _open_clip(torch_mod)
    tok = tk.Tokenizer()
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text), repr(text)
    for length in CONTEXTS:
        expected = ref(CORPUS, context_length=length).numpy()
        np.testing.assert_array_equal(tok(CORPUS, context_length=length), expected)
    rows = tok(CORPUS)
    for row in rows:
        assert tok.decode(row) == ref.decode(row.tolist())


def test_matches_open_clip_fuzz_without_mojibake_repair(torch_mod, monkeypatch):
    # Random mixes can look like mojibake to ftfy, which we deliberately do not repair; with only
    # that ftfy step switched off, everything else (cleaning, splitting, BPE) must agree exactly.
    ref = _open_clip(torch_mod)
    import ftfy
    import open_clip.tokenizer as oc_tok

    no_repair = type("NoRepairFtfy", (), {
        "fix_text": staticmethod(functools.partial(ftfy.fix_text, fix_encoding=False))})
    monkeypatch.setattr(oc_tok, "ftfy", no_repair)
    tok = tk.Tokenizer()
    texts = _fuzz_corpus(600)
    for length in CONTEXTS:
        np.testing.assert_array_equal(tok(texts, context_length=length),
                                      ref(texts, context_length=length).numpy())


def test_mojibake_divergence_is_only_ftfy_repair(torch_mod, monkeypatch):
    # Documented gap: full ftfy repairs mojibake ("sÃ³" -> "só"); we keep the characters as given.
    ref = _open_clip(torch_mod)
    tok = tk.Tokenizer()
    full = [ref.encode(t) for t in MOJIBAKE]
    import ftfy
    import open_clip.tokenizer as oc_tok

    monkeypatch.setattr(oc_tok, "ftfy", type("NoRepairFtfy", (), {
        "fix_text": staticmethod(functools.partial(ftfy.fix_text, fix_encoding=False))}))
    for text, repaired in zip(MOJIBAKE, full, strict=True):
        ours = tok.encode(text)
        assert ours == ref.encode(text), repr(text)
        assert ours != repaired, f"ftfy no longer repairs {text!r}; update the module docstring"


# ------------------------------------------------------------------------------------------------
# Word splitting vs the `regex` package (the engine CLIP uses)
# ------------------------------------------------------------------------------------------------

_CLIP_PATTERN = (r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
                 r"|[^\s\p{L}\p{N}]+")


def _assigned_chars() -> list[str]:
    # Every character assigned in this Python's Unicode version, except surrogates and
    # U+001C..U+001F (whitespace to `re`, not to `regex`; cleaning removes them before splitting).
    return [chr(cp) for cp in range(0x110000)
            if unicodedata.category(chr(cp)) not in ("Cn", "Cs") and not 0x1C <= cp <= 0x1F]


def test_word_pattern_classifies_every_char_like_regex():
    regex = pytest.importorskip("regex")
    # "a" + c + "." splits as ["ac", "."] for a letter, ["a", c, "."] for a number, ["a", c + "."]
    # for other symbols and ["a", "."] for spaces / dropped characters.
    probe = " ".join("a" + c + "." for c in _assigned_chars())
    expected = regex.compile(_CLIP_PATTERN, regex.IGNORECASE).findall(probe)
    got = tk.word_pattern().findall(probe)
    assert len(got) == len(expected)
    diff = [(g, e) for g, e in zip(got, expected, strict=True) if g != e]
    assert not diff, diff[:10]


def test_word_pattern_case_folded_literals_like_regex():
    regex = pytest.importorskip("regex")
    chars = "".join(_assigned_chars())
    for letter in set("<start_of_text><end_of_text>'s't're've'm'll'd"):
        expected = regex.findall(regex.escape(letter), chars, regex.IGNORECASE)
        got = re.findall(tk._ci_literal(letter), chars)
        assert got == expected, letter


# ------------------------------------------------------------------------------------------------
# API contract
# ------------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_padding():
    tok = tk.Tokenizer(context_length=16)
    one = tok("a photo of a cat")
    assert one.shape == (1, 16) and one.dtype == np.int32
    np.testing.assert_array_equal(one[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (one[0, 7:] == 0).all()
    assert tok([], context_length=5).shape == (0, 5)
    assert tok(("a", "b")).shape == (2, 16)
    for blank in ("", "  \n\t "):
        np.testing.assert_array_equal(tok(blank)[0, :3], [tk.SOT_ID, tk.EOT_ID, 0])
    # Truncation keeps EOT last, for every length down to 2.
    ids = tok.encode(_LONG)
    for length in (2, 3, 10, 77):
        row = tok(_LONG, context_length=length)[0]
        np.testing.assert_array_equal(row, [tk.SOT_ID, *ids[:length - 2], tk.EOT_ID])


def test_vocabulary_layout():
    tok = tk.get_tokenizer()
    assert tok.vocab_size == 49408 and len(tok._encoder) == 49408
    assert tok.decode([tk.SOT_ID, tk.EOT_ID]) == "<start_of_text><end_of_text>"
    # ids 0..255 are single bytes in bytes_to_unicode order; 256..511 the same with </w>.
    assert tok.decode([0]) == "!" and tok.decode([256]) == "! "
    assert tok.encode("cat") == [2368] and tok.decode([2368]) == "cat "


def test_decode_round_trip():
    tok = tk.get_tokenizer()
    for text in CORPUS:
        cleaned = tk.clean_text(text)
        words = tk.word_pattern().findall(cleaned)
        expected = "".join(w if w in (tk.SOT_TOKEN, tk.EOT_TOKEN) else w + " " for w in words)
        assert tok.decode(tok.encode(text)) == expected, repr(text)


def test_bad_input_raises():
    tok = tk.get_tokenizer()
    with pytest.raises(TypeError, match="expects str"):
        tok(["ok", None])
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(b"bytes")
    for length in (1, 0, -3, 7.5, True):
        with pytest.raises(ValueError, match="context_length"):
            tok("a", context_length=length)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_bad_vocab_file(tmp_path):
    import gzip

    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version\ni n\nt h\n")
    with pytest.raises(ValueError, match="merge lines"):
        tk.Tokenizer(str(path))


def test_pickle_and_cache():
    tok = tk.get_tokenizer(32)
    assert tk.get_tokenizer(32) is tok and tok.context_length == 32
    expected = tok(CORPUS)
    data = pickle.dumps(tok)
    assert len(data) < 1000  # state is the path and the length, not the tables
    clone = pickle.loads(data)
    assert clone.context_length == 32 and clone.vocab_path == tok.vocab_path
    np.testing.assert_array_equal(clone(CORPUS), expected)


# ------------------------------------------------------------------------------------------------
# Reference generation
# ------------------------------------------------------------------------------------------------


def _generate_reference() -> None:
    """Writes tests/data/tokenizer_reference.json from open_clip (run once, by hand)."""
    from torch_shim import import_torch  # tests/ is sys.path[0]: python tests/test_tokenizer.py

    import_torch()
    import ftfy
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")
    rows77 = ref(CORPUS, context_length=77).numpy()
    out = {
        "source": f"open_clip_torch {open_clip.__version__} get_tokenizer('ViT-B-32'), "
                  f"ftfy {ftfy.__version__}",
        # unicode_escape keeps lone surrogates apart (JSON would pair them into one character).
        "texts_escaped": [t.encode("unicode_escape").decode("ascii") for t in CORPUS],
        "encode": [ref.encode(t) for t in CORPUS],
        "ctx77": rows77.tolist(),
        "ctx32": ref(CORPUS, context_length=32).numpy().tolist(),
        "decode": [ref.decode([i for i in row.tolist() if i]) for row in rows77],
    }
    os.makedirs(os.path.dirname(REFERENCE_PATH), exist_ok=True)
    with open(REFERENCE_PATH, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {REFERENCE_PATH}: {len(CORPUS)} texts")


if __name__ == "__main__":
    _generate_reference()


# ------------------------------------------------------------------ SentencePiece (SigLIP)
SIGLIP_TEXTS = ["A photo of a Cat!", "two  people, riding... bicycles down a busy street next to "
                "parked cars", "", "zebra QUICK fox?", "red_car (blue) house.", "   \t  "]


@pytest.mark.parametrize("length", [8, 16])
def test_sentencepiece_ids_equal_hf_siglip_tokenizer(spm_model, length):
    """Canonicalised pieces + EOS (kept when truncating) + pad 1, as HF's SiglipTokenizer with
    max_length padding and truncation."""
    transformers = pytest.importorskip("transformers")
    ours = tk.SentencePieceTokenizer(spm_model, length, pad_id=1)
    hf = transformers.SiglipTokenizer(vocab_file=spm_model)
    ref = hf(SIGLIP_TEXTS, padding="max_length", truncation=True, max_length=length)
    np.testing.assert_array_equal(ours(SIGLIP_TEXTS), np.asarray(ref["input_ids"]))
    assert ours(SIGLIP_TEXTS).dtype == np.int32


def test_sentencepiece_is_picklable_and_chosen_by_the_model_config(spm_model):
    import pickle

    tok = tk.tokenizer_for(spm_model, 8, 1)
    assert isinstance(tok, tk.SentencePieceTokenizer) and tk.tokenizer_for(spm_model, 8, 1) is tok
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again(SIGLIP_TEXTS), tok(SIGLIP_TEXTS))
    assert isinstance(tk.tokenizer_for("clip", 77), tk.Tokenizer)
    with pytest.raises(ValueError, match="SentencePiece"):
        tk.tokenizer_for("", 64, 1)
    with pytest.raises(FileNotFoundError, match="not found"):
        tk.tokenizer_for("/nonexistent/spm.model", 64, 1)
