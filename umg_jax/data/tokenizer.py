"""CLIP byte-level BPE tokenizer (ids identical to OpenAI CLIP / open_clip ``SimpleTokenizer``).

Pipeline of ``Tokenizer.encode(text)``:

1. Clean (``clean_text``): a subset of ``ftfy.fix_text`` (see below), HTML unescape, whitespace
   collapse, lowercase — the "lower" cleaning of open_clip.
2. Split into words with CLIP's pattern: the two special tokens, the contractions
   ``'s 't 're 've 'm 'll 'd``, runs of letters, single digits, runs of other non-space characters.
3. Map each word's UTF-8 bytes to printable characters (``bytes_to_unicode``), mark the last
   character with ``</w>``, and apply the BPE merges in rank order.

Vocabulary (49408 ids): 256 byte characters, the same 256 with ``</w>``, 48894 merges, then
``<start_of_text>`` = 49406 and ``<end_of_text>`` = 49407.

Divergences from open_clip (which runs the full ``ftfy.fix_text``), documented and tested:

- No mojibake repair (ftfy's ``fix_encoding``): e.g. ``"sÃ³"`` stays ``"sã³"`` here while ftfy
  turns it into ``"só"``. Everything else ftfy does by default is reproduced: HTML entities
  (including its all-caps ``&EACUTE;`` forms), C1 controls as Windows-1252, Latin ligatures,
  full-/half-width forms, curly quotes, surrogate pairs, ANSI escapes, control characters, NFC.
- Letter / number classes come from Python's ``unicodedata`` (Unicode 14.0 on Python 3.11)
  instead of the ``regex`` package's newer tables: characters assigned after Unicode 14 (e.g.
  CJK Extension H/I) count as "other" symbols here. Every character assigned in Unicode 14 is
  classified exactly as ``regex`` does (tested exhaustively).

SigLIP models use a SentencePiece vocabulary instead (:class:`SentencePieceTokenizer`, a
user-supplied ``.model`` file named by ``config.model.text.tokenizer``, a local path or a
``gs://`` / ``s3://`` object); :func:`tokenizer_for` picks the one a model config names.
"""

from __future__ import annotations

import functools
import gzip
import html
import html.entities
import os
import re
import string
import unicodedata
from collections.abc import Sequence

import numpy as np

DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merge lines follow the version header
_WORD_END = "</w>"
_MAX_CACHE = 500_000  # per-word BPE cache entries before the cache is dropped (bounds memory)


# ----------------------------------------------------------------------------------------------
# Byte <-> printable character table
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Maps each byte 0..255 to a printable character; insertion order is the vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the other
    68 bytes (controls, space, soft hyphen) take code points 256, 257, ... in byte order, so that
    BPE never sees whitespace or control characters.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


# ----------------------------------------------------------------------------------------------
# Text cleaning (ftfy-like + open_clip "lower")
# ----------------------------------------------------------------------------------------------

# Only semicolon-terminated references, like ftfy (html.unescape alone would also decode "&not").
_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_C1_RE = re.compile(r"[\x80-\x9f]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")

_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn",
    "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}


@functools.lru_cache(maxsize=1)
def _fix_table() -> dict[int, str | None]:
    """One ``str.translate`` table: ligatures, widths, curly quotes, invisible controls."""
    table: dict[int, str | None] = {ord(k): v for k, v in _LIGATURES.items()}
    # Fullwidth ASCII / halfwidth katakana & hangul -> standard width; ideographic space -> space.
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(cp))
        if normal != chr(cp):
            table[cp] = normal
    for cp in (0x02BC, *range(0x2018, 0x201C)):
        table[cp] = "'"
    for cp in range(0x201C, 0x2020):
        table[cp] = '"'
    # Controls with no visible effect (keeps \t \n \f \r, joiners, bidi marks, emoji tags).
    for cp in (*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
               0xFEFF, *range(0xFFF9, 0xFFFD)):
        table[cp] = None
    return table


def _c1_to_cp1252(match: re.Match[str]) -> str:
    # Browsers read stray C1 controls as Windows-1252; undefined slots keep their Latin-1 value.
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _unescape_entity(match: re.Match[str]) -> str:
    """ftfy's strict entity decoding: whole named / numeric references only, plus all-caps forms
    of lowercase names (``&EACUTE;`` -> ``É``) when the caps form is not an entity itself."""
    entity = match.group(0)
    name = entity[1:]
    known = html.entities.html5.get(name)
    if known is not None:
        return known
    if entity.startswith("&#"):
        decoded = html.unescape(entity)
        return entity if ";" in decoded else decoded  # partly decoded: leave it alone
    lower = name.lower()
    if name == lower.upper() != lower and lower in html.entities.html5 \
            and html.unescape(entity) == entity:
        return html.entities.html5[lower].upper()
    return entity


def _fix_segment(text: str, unescape: bool) -> str:
    """ftfy's per-line fixer loop (without mojibake repair), run to a fixed point."""
    table = _fix_table()
    for _ in range(16):  # each pass only shrinks / normalises; a few passes always suffice
        before = text
        if unescape:
            text = _ENTITY_RE.sub(_unescape_entity, text)
        text = _C1_RE.sub(_c1_to_cp1252, text)
        text = _ANSI_RE.sub("", text)  # before control removal, which would eat the ESC
        text = text.translate(table)
        if _SURROGATE_RE.search(text):
            # Paired surrogates -> the astral character, lone ones -> U+FFFD.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        text = unicodedata.normalize("NFC", text)
        if text == before:
            break
    return text


def fix_text(text: str) -> str:
    """The subset of ``ftfy.fix_text`` described in the module docstring.

    Like ftfy, works line by line, and stops decoding HTML entities from the first line that
    contains a literal ``<`` on (such text is taken to be real HTML).
    """
    unescape = True
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "<" in line:
            unescape = False
        lines[i] = _fix_segment(line, unescape)
    return "\n".join(lines)


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: fix, HTML-unescape twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(fix_text(text)))
    return " ".join(text.split()).lower()


# ----------------------------------------------------------------------------------------------
# Word splitting
# ----------------------------------------------------------------------------------------------


def _class_body(predicate) -> str:
    """Regex character-class body (``\\Uxxxxxxxx`` ranges) of code points where predicate holds."""
    parts = []
    start = None
    for cp in range(0x110001):
        inside = cp <= 0x10FFFF and predicate(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            end = cp - 1
            parts.append(f"\\U{start:08x}" if start == end else f"\\U{start:08x}-\\U{end:08x}")
            start = None
    return "".join(parts)


# Characters that the regex package's case-insensitive matching treats as the same letter, beyond
# plain upper / lower case (only letters that occur in the literals of the pattern matter).
_EXTRA_CASE_FOLDS = {"s": "\u017f", "k": "\u212a"}


def _ci_literal(word: str) -> str:
    """Case-insensitive regex for a literal, as CLIP's ``re.IGNORECASE`` pattern matches it."""
    out = []
    for ch in word:
        if ch.isalpha():
            variants = ch.lower() + ch.upper() + _EXTRA_CASE_FOLDS.get(ch.lower(), "")
            out.append("[" + "".join(dict.fromkeys(variants)) + "]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


@functools.lru_cache(maxsize=1)
def word_pattern() -> re.Pattern[str]:
    """CLIP's word pattern, built with ``re`` and ``unicodedata`` (no ``regex`` dependency).

    ``specials | 's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+``. The original is
    compiled with IGNORECASE; that only matters for the literals (handled by ``_ci_literal``) and
    for U+0345 COMBINING GREEK YPOGEGRAMMENI, which, case-folding to a letter, matches no branch
    and is dropped.
    """
    letters = _class_body(lambda c: unicodedata.category(c)[0] == "L")
    numbers = _class_body(lambda c: unicodedata.category(c)[0] == "N")
    literals = [SOT_TOKEN, EOT_TOKEN, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    alternatives = [_ci_literal(w) for w in literals]
    alternatives += [f"[{letters}]+", f"[{numbers}]", f"[^\\s{letters}{numbers}\\u0345]+"]
    return re.compile("|".join(alternatives))


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_tables(vocab_path: str) -> tuple[dict[str, int], dict[tuple[str, str], int], list[str]]:
    """Reads the merge file. Returns (symbol -> id, merge pair -> rank, id -> symbol)."""
    with gzip.open(vocab_path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{vocab_path}: expected {NUM_MERGES} merge lines 'a b' after the header "
                         f"line, got {len(merges)} (is this CLIP's bpe_simple_vocab_16e6.txt.gz?)")
    byte_chars = list(bytes_to_unicode().values())
    symbols = byte_chars + [c + _WORD_END for c in byte_chars]
    symbols += [a + b for a, b in merges]
    symbols += [SOT_TOKEN, EOT_TOKEN]
    encoder = {s: i for i, s in enumerate(symbols)}
    if len(encoder) != VOCAB_SIZE or encoder[SOT_TOKEN] != SOT_ID:
        raise ValueError(f"{vocab_path}: vocabulary has {len(encoder)} distinct symbols, "
                         f"expected {VOCAB_SIZE}")
    ranks = {m: r for r, m in enumerate(merges)}
    return encoder, ranks, symbols


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


class Tokenizer:
    """CLIP BPE tokenizer. Picklable (pickles only its path and context length).

    Args:
      vocab_path: CLIP merge file (gzip); default: the copy shipped in ``umg_jax/data``.
      context_length: default row length L of ``__call__``.
    """

    vocab_size = VOCAB_SIZE
    sot_token_id = SOT_ID
    eot_token_id = EOT_ID

    def __init__(self, vocab_path: str | None = None, context_length: int = 77):
        self.vocab_path = os.path.abspath(vocab_path or DEFAULT_VOCAB_PATH)
        self.context_length = _check_context_length(context_length)
        self._encoder, self._ranks, self._symbols = load_tables(self.vocab_path)
        self._pattern = word_pattern()
        self._clean = clean_text
        byte_chars = bytes_to_unicode()
        # latin-1 view of a word's UTF-8 bytes -> BPE alphabet, and back.
        self._to_bpe_chars = str.maketrans({chr(b): c for b, c in byte_chars.items()})
        self._from_bpe_chars = str.maketrans({c: chr(b) for b, c in byte_chars.items()})
        self._specials = {SOT_TOKEN: SOT_ID, EOT_TOKEN: EOT_ID}
        self._cache: dict[str, tuple[int, ...]] = {}

    def __getstate__(self) -> dict:
        return {"vocab_path": self.vocab_path, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_path"], state["context_length"])

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-split word (cached)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        chars = word.encode("utf-8").decode("latin-1").translate(self._to_bpe_chars)
        parts = [*chars[:-1], chars[-1] + _WORD_END]
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = NUM_MERGES, None
            for pair in zip(parts, parts[1:], strict=False):
                rank = ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(parts)
            while i < n:  # merge every non-overlapping occurrence, left to right
                if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self._encoder[p] for p in parts)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start / end tokens or padding."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        for word in self._pattern.findall(self._clean(text)):
            special = self._specials.get(word)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._bpe(word))
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``: every id is decoded, including start / end / padding (0 = ``!``).

        Word ends become spaces, so the result has a trailing space after each word; invalid UTF-8
        (a multi-byte character cut by truncation) becomes U+FFFD.
        """
        pieces = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} outside the vocabulary [0, {VOCAB_SIZE})")
            pieces.append(self._symbols[i])
        raw = "".join(pieces).translate(self._from_bpe_chars).encode("latin-1")
        return raw.decode("utf-8", errors="replace").replace(_WORD_END, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Tokenizes ``texts`` to ``[N, L] int32`` rows: SOT, tokens, EOT, zero padding.

        A text longer than L keeps its first L - 1 ids (SOT included) and ends with EOT, exactly
        as open_clip's ``tokenize``. A single string gives N = 1.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = _check_context_length(
            self.context_length if context_length is None else context_length)
        out = np.zeros((len(texts), length), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text)][:length - 1]
            ids.append(EOT_ID)
            out[row, :len(ids)] = ids
        return out


def _check_context_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 2:
        raise ValueError(
            f"context_length must be an int >= 2 (room for SOT and EOT), got {length!r}")
    return int(length)


@functools.lru_cache(maxsize=8)
def get_tokenizer(context_length: int = 77) -> Tokenizer:
    """The shared default tokenizer (loading the merges takes ~0.5 s, so it is built once)."""
    return Tokenizer(context_length=context_length)


# ----------------------------------------------------------------------------------------------
# SentencePiece (SigLIP)
# ----------------------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """big_vision's prompt canonicalisation (also HF ``SiglipTokenizer`` and open_clip's
    ``clean="canonicalize"``): lower-case, ASCII punctuation removed, whitespace collapsed."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class SentencePieceTokenizer:
    """SigLIP's tokenizer over a SentencePiece ``.model`` file (big_vision ``tokenize(model=...,
    eos="sticky", pad_value=1)``; ids equal HF ``SiglipTokenizer`` with ``padding="max_length",
    truncation=True``): canonicalised text, its pieces, then EOS, which a truncated row keeps as
    its last id; rows padded with ``pad_id``. Picklable (pickles its path and settings)."""

    def __init__(self, model_path: str, context_length: int = 64, pad_id: int = 1):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError("a SentencePiece tokenizer needs sentencepiece "
                              "(pip install sentencepiece)") from None
        from umg_jax import storage

        # A local path (made absolute) or a gs:// / s3:// object, read through a local copy.
        self.model_path = str(storage.path(model_path))
        if not storage.path(self.model_path).is_file():
            raise FileNotFoundError(f"SentencePiece model {os.fspath(model_path)!r} not found "
                                    "(model.text.tokenizer)")
        self.context_length = _check_context_length(context_length)
        self.pad_id = int(pad_id)
        with storage.local_file(self.model_path) as local:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(local))
        self.vocab_size = self._sp.get_piece_size()
        self.eot_token_id = self._sp.eos_id()
        if self.eot_token_id < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no EOS piece")

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "context_length": self.context_length,
                "pad_id": self.pad_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"], state["context_length"], state["pad_id"])

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (canonicalised) without EOS or padding."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}: {text!r}")
        return list(self._sp.encode(canonicalize(text)))

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """``[N, L] int32`` rows: pieces, EOS (kept when truncating), ``pad_id`` padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = _check_context_length(
            self.context_length if context_length is None else context_length)
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:length - 1] + [self.eot_token_id]
            out[row, :len(ids)] = ids
        return out


def tokenizer_for(spec: str, context_length: int, pad_id: int = 0):
    """The tokenizer a model was trained with (``config.model.text.tokenizer``): ``"clip"`` ->
    the embedded CLIP BPE, else a SentencePiece model file (SigLIP) padded with ``pad_id``."""
    if spec == "clip":
        return get_tokenizer(context_length)
    if not spec:
        raise ValueError("model.text.tokenizer is empty: this model (a SigLIP import) needs its "
                         "SentencePiece .model file; pass --config.model.text.tokenizer=PATH")
    from umg_jax import storage

    return _sentencepiece(str(storage.path(spec)), int(context_length), int(pad_id))


def for_model(text_cfg):
    """The tokenizer of a ``config.model.text`` section (:func:`tokenizer_for`)."""
    return tokenizer_for(text_cfg.get("tokenizer", "clip"), text_cfg.context_length,
                         text_cfg.get("pad_id", 0))


@functools.lru_cache(maxsize=8)
def _sentencepiece(path: str, context_length: int, pad_id: int) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(path, context_length, pad_id)
