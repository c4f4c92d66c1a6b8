"""Data for the experiments: a corpus, a local BPE tokenizer and batches, all offline.

* **Corpus** -- the Python standard library's own ``.py`` sources of the running
  interpreter (:func:`stdlib_corpus`), split deterministically into train and
  validation files by a hash of the relative path.
* **Tokenizer** -- a byte-level BPE trained locally with HF ``tokenizers``
  (:func:`train_tokenizer`), cached on disk, with a pure byte fallback
  (:class:`ByteTokenizer`, vocabulary 256).
* **Batches** -- random training windows (:func:`batch_iterator`) and
  deterministic contiguous evaluation windows (:func:`eval_batches`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

try:  # Optional dependency (the ``experiments`` extra).
  import tokenizers as hf_tokenizers
except ImportError:  # pragma: no cover - exercised only without the extra.
  hf_tokenizers = None

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "END_OF_TEXT",
    "Tokenizer",
    "batch_iterator",
    "default_cache_dir",
    "encode_corpus",
    "eval_batches",
    "prepare_data",
    "split_train_val",
    "stdlib_corpus",
    "stdlib_source_files",
    "train_tokenizer",
]

# -----------------------------------------------------------------------------
# Corpus
# -----------------------------------------------------------------------------

# Directory names skipped anywhere in a relative path. ``test``/``tests`` drop
# the regression suite (``test/``), ``unittest/test``, ``ctypes/test``,
# ``tkinter/test``, ``distutils/tests`` and ``lib2to3/tests`` (whose data files
# are deliberately malformed); ``idle_test`` drops ``idlelib/idle_test``.
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_source_files(*, root: str | os.PathLike | None = None) -> list[str]:
  """Lists the standard library's ``.py`` files, sorted by relative path.

  Files below a directory named in :data:`EXCLUDED_DIRS` (``site-packages``,
  test suites, ``__pycache__``) are skipped.

  Args:
    root: Directory to scan. Defaults to the running interpreter's
      ``sysconfig.get_paths()["stdlib"]``.

  Returns:
    POSIX-style paths relative to ``root``, sorted lexicographically.
  """
  root = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
  relative_paths = []
  for directory, subdirectories, filenames in os.walk(root):
    subdirectories[:] = [d for d in subdirectories if d not in EXCLUDED_DIRS]
    relative_dir = pathlib.Path(directory).relative_to(root)
    relative_paths.extend(
        (relative_dir / name).as_posix() for name in filenames if name.endswith(".py")
    )
  return sorted(relative_paths)


def _unit_hash(text: str) -> float:
  """Maps a string to a stable pseudo-random number in ``[0, 1)``."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_train_val(
    relative_paths: Sequence[str], *, val_fraction: float = 0.02
) -> tuple[list[str], list[str]]:
  """Splits file names into train and validation by a stable hash of the name.

  A file goes to validation when ``sha256(path)`` mapped to ``[0, 1)`` is below
  ``val_fraction``, so a file's split does not depend on which other files are
  present. With two or more files neither split is empty: if hashing leaves one
  side empty, the file whose hash is closest to the threshold is moved over.

  Args:
    relative_paths: File names (any order; the output keeps it).
    val_fraction: Expected fraction of files in the validation split.

  Returns:
    ``(train_paths, val_paths)``, disjoint, in the input order.
  """
  if not 0.0 <= val_fraction <= 1.0:
    raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}.")
  hashes = {path: _unit_hash(path) for path in relative_paths}
  val_set = {path for path in relative_paths if hashes[path] < val_fraction}
  if len(relative_paths) >= 2:
    if not val_set:
      val_set = {min(relative_paths, key=hashes.__getitem__)}
    elif len(val_set) == len(relative_paths):
      val_set.remove(max(relative_paths, key=hashes.__getitem__))
  train_paths = [path for path in relative_paths if path not in val_set]
  val_paths = [path for path in relative_paths if path in val_set]
  return train_paths, val_paths


def _read_source(path: pathlib.Path) -> str:
  return path.read_text(encoding="utf-8", errors="replace")


def stdlib_corpus(
    *,
    val_fraction: float = 0.02,
    max_bytes: int | None = None,
    root: str | os.PathLike | None = None,
) -> tuple[list[str], list[str]]:
  """Loads the standard library sources as train and validation documents.

  Files from :func:`stdlib_source_files` are read as UTF-8 with
  ``errors="replace"``; blank files (e.g. empty ``__init__.py``) are dropped.
  With ``max_bytes``, whole files are taken in sorted-path order while the
  running total of their UTF-8 sizes stays within ``max_bytes`` (at least two
  files are always taken). The selection is then split with
  :func:`split_train_val`, so both splits are non-empty.

  Args:
    val_fraction: Expected fraction of files used for validation.
    max_bytes: Optional cap on the total size, for quick runs.
    root: Directory to scan; defaults to the running interpreter's stdlib.

  Returns:
    ``(train_texts, val_texts)``: lists of document strings, each in sorted
    relative-path order.
  """
  root = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
  selected: dict[str, str] = {}
  total_bytes = 0
  for relative_path in stdlib_source_files(root=root):
    text = _read_source(root / relative_path)
    if not text.strip():
      continue
    size = len(text.encode("utf-8"))
    if max_bytes is not None and total_bytes + size > max_bytes and len(selected) >= 2:
      break
    selected[relative_path] = text
    total_bytes += size
  if len(selected) < 2:
    raise ValueError(f"Found fewer than two source files under {root}.")
  train_paths, val_paths = split_train_val(list(selected), val_fraction=val_fraction)
  return [selected[p] for p in train_paths], [selected[p] for p in val_paths]


# -----------------------------------------------------------------------------
# Tokenizers
# -----------------------------------------------------------------------------

END_OF_TEXT = "<|endoftext|>"
# Bump when the tokenizer recipe changes, to invalidate old caches.
_TOKENIZER_RECIPE = "bytelevel-bpe-v1"


class Tokenizer(Protocol):
  """What the rest of the module needs from a tokenizer."""

  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """Tokenizes text as its UTF-8 bytes (vocabulary 256).

  The end-of-text token is byte 0 (NUL), which does not occur in Python source
  files, so no extra vocabulary entry is needed.
  """

  vocab_size = 256
  eot_id = 0
  name = "bytes"
  cache_dir = None

  def encode(self, text: str) -> list[int]:
    """Returns the UTF-8 bytes of ``text`` as a list of ints."""
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes several texts."""
    return [self.encode(text) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes byte ids back to text (invalid UTF-8 becomes U+FFFD)."""
    return np.asarray(list(ids), dtype=np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=256)"


class BPETokenizer:
  """A byte-level BPE tokenizer backed by an HF ``tokenizers.Tokenizer``.

  Attributes:
    vocab_size: Number of token ids, including the end-of-text token.
    eot_id: Id of :data:`END_OF_TEXT`.
    name: Cache key, ``bpe-v<vocab>-<corpus hash>``.
    cache_dir: Directory holding the tokenizer file and token caches, or None.
  """

  def __init__(self, hf_tokenizer: Any, *, name: str, cache_dir: pathlib.Path | None = None):
    self.hf_tokenizer = hf_tokenizer
    self.vocab_size = hf_tokenizer.get_vocab_size()
    self.eot_id = hf_tokenizer.token_to_id(END_OF_TEXT)
    self.name = name
    self.cache_dir = cache_dir

  def encode(self, text: str) -> list[int]:
    """Encodes ``text`` to token ids (no special tokens are added)."""
    return self.hf_tokenizer.encode(text).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes several texts in parallel."""
    return [encoding.ids for encoding in self.hf_tokenizer.encode_batch(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes token ids back to the exact text."""
    return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"BPETokenizer(vocab_size={self.vocab_size}, name={self.name!r})"


def default_cache_dir() -> pathlib.Path:
  """Returns the tokenizer cache directory.

  ``$SLIMOPTAX_CACHE/tokenizers`` if the ``SLIMOPTAX_CACHE`` environment
  variable is set, else ``~/.cache/slimoptax/tokenizers``.
  """
  root = os.environ.get("SLIMOPTAX_CACHE")
  root = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "slimoptax"
  return root.expanduser() / "tokenizers"


def _texts_digest(texts: Sequence[str], *, salt: str = "") -> str:
  """A sha256 hex digest of a list of documents (boundaries included)."""
  hasher = hashlib.sha256(salt.encode("utf-8"))
  for text in texts:
    data = text.encode("utf-8")
    hasher.update(len(data).to_bytes(8, "little"))
    hasher.update(data)
  return hasher.hexdigest()


def _atomic_write(path: pathlib.Path, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp_path)`` then renames into place (safe for concurrent runs)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    write(str(tmp_path))
    os.replace(tmp_path, path)
  finally:
    if tmp_path.exists():
      tmp_path.unlink()


def _new_hf_bpe(vocab_size: int) -> tuple[Any, Any]:
  """Returns an untrained byte-level BPE tokenizer and its trainer."""
  models, pre_tokenizers = hf_tokenizers.models, hf_tokenizers.pre_tokenizers
  hf_tokenizer = hf_tokenizers.Tokenizer(models.BPE())
  hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf_tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[END_OF_TEXT],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  return hf_tokenizer, trainer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> BPETokenizer | ByteTokenizer:
  """Trains (or loads from cache) a byte-level BPE tokenizer on ``texts``.

  The tokenizer uses HF ``tokenizers``: a ``ByteLevel`` pre-tokenizer and
  decoder (so any text round-trips exactly), a ``BPE`` model, and the special
  token :data:`END_OF_TEXT` (id 0). The trained tokenizer is saved as
  ``<cache_dir>/bpe-v<vocab_size>-<hash>.json`` where ``<hash>`` is a sha256 of
  the training documents; a later call with the same documents loads it.

  Falls back to :class:`ByteTokenizer` when ``vocab_size == 256`` or when
  ``tokenizers`` is not installed (with a warning if a different vocabulary
  size was requested).

  Args:
    texts: Training documents.
    vocab_size: Requested vocabulary size including the end-of-text token
      (at least 257 for BPE). A very small corpus may yield fewer tokens.
    cache_dir: Cache directory; defaults to :func:`default_cache_dir`.

  Returns:
    A tokenizer with ``encode``, ``decode``, ``vocab_size`` and ``eot_id``.
  """
  if vocab_size == 256:
    return ByteTokenizer()
  if hf_tokenizers is None:
    warnings.warn(
        f"`tokenizers` is not installed; using ByteTokenizer (vocab 256) instead of "
        f"BPE with vocab_size={vocab_size}.",
        stacklevel=2,
    )
    return ByteTokenizer()
  if vocab_size < 257:
    raise ValueError(f"BPE needs vocab_size >= 257 (256 bytes + end-of-text), got {vocab_size}.")
  texts = list(texts)
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  corpus_digest = _texts_digest(texts, salt=_TOKENIZER_RECIPE)
  name = f"bpe-v{vocab_size}-{corpus_digest[:16]}"
  path = cache_dir / f"{name}.json"
  if path.exists():
    hf_tokenizer = hf_tokenizers.Tokenizer.from_file(str(path))
    return BPETokenizer(hf_tokenizer, name=name, cache_dir=cache_dir)
  hf_tokenizer, trainer = _new_hf_bpe(vocab_size)
  hf_tokenizer.train_from_iterator(texts, trainer, length=len(texts))
  _atomic_write(path, hf_tokenizer.save)
  return BPETokenizer(hf_tokenizer, name=name, cache_dir=cache_dir)


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def encode_corpus(
    texts: Iterable[str], tokenizer: Tokenizer, *, use_cache: bool = True
) -> np.ndarray:
  """Encodes documents into one token stream, each followed by end-of-text.

  For a tokenizer with a ``cache_dir`` (a BPE from :func:`train_tokenizer`), the
  stream is cached as ``<cache_dir>/<tokenizer name>.tokens-<hash>.npy``, keyed
  by a sha256 of ``texts``.

  Args:
    texts: Documents.
    tokenizer: Tokenizer to apply.
    use_cache: Whether to read/write the on-disk cache.

  Returns:
    A 1-D array, ``uint16`` when the vocabulary fits, else ``int32``:
    ``doc_0 <eot> doc_1 <eot> ...``.
  """
  texts = list(texts)
  dtype = _token_dtype(tokenizer.vocab_size)
  cache_dir = getattr(tokenizer, "cache_dir", None)
  path = None
  if use_cache and cache_dir is not None:
    digest = _texts_digest(texts, salt=getattr(tokenizer, "name", ""))[:16]
    path = pathlib.Path(cache_dir) / f"{tokenizer.name}.tokens-{digest}.npy"
    if path.exists():
      return np.load(path)
  if hasattr(tokenizer, "encode_batch"):
    encoded = tokenizer.encode_batch(texts)
  else:
    encoded = [tokenizer.encode(text) for text in texts]
  eot = np.array([tokenizer.eot_id], dtype=dtype)
  pieces = []
  for ids in encoded:
    pieces.extend([np.asarray(ids, dtype=dtype), eot])
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
  if path is not None:
    _atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), tokens))
  return tokens


def prepare_data(
    *,
    vocab_size: int,
    val_fraction: float = 0.02,
    max_bytes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
  """Corpus + tokenizer + token streams in one call.

  The tokenizer is trained on the training documents only.

  Args:
    vocab_size: Tokenizer vocabulary size (256 for bytes).
    val_fraction: Validation fraction, see :func:`stdlib_corpus`.
    max_bytes: Optional corpus size cap, see :func:`stdlib_corpus`.
    cache_dir: Tokenizer/token cache directory.

  Returns:
    ``(tokenizer, train_tokens, val_tokens)``.
  """
  train_texts, val_texts = stdlib_corpus(val_fraction=val_fraction, max_bytes=max_bytes)
  tokenizer = train_tokenizer(train_texts, vocab_size, cache_dir=cache_dir)
  return tokenizer, encode_corpus(train_texts, tokenizer), encode_corpus(val_texts, tokenizer)


# -----------------------------------------------------------------------------
# Batches
# -----------------------------------------------------------------------------


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Gathers ``tokens[s : s + seq_len + 1]`` for each start; returns (x, y)."""
  window = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return window[:, :-1], window[:, 1:]


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
  if tokens.ndim != 1 or len(tokens) < seq_len + 1:
    raise ValueError(f"Need a 1-D token stream of at least seq_len + 1 = {seq_len + 1} tokens.")


def batch_iterator(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields random training windows forever.

  Each row starts at a uniform random offset drawn with
  ``np.random.default_rng(seed)``, so the sequence of batches is a function of
  ``seed`` alone.

  Args:
    tokens: 1-D token stream.
    batch_size: Rows per batch.
    seq_len: Tokens per row.
    seed: Seed of the numpy Generator.

  Yields:
    ``(x, y)`` int32 arrays of shape ``(batch_size, seq_len)`` with
    ``y[:, t] == x[:, t + 1]`` (next-token targets).
  """
  tokens = np.asarray(tokens)
  _check_length(tokens, seq_len)
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    yield _windows(tokens, starts, seq_len)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Splits a token stream into deterministic contiguous evaluation batches.

  Windows start at ``0, seq_len, 2 seq_len, ...`` so every token (but the
  first) is predicted at most once. Only full batches are returned, except
  that a stream too short for one full batch gives a single smaller batch.

  Args:
    tokens: 1-D token stream.
    batch_size: Rows per batch.
    seq_len: Tokens per row.
    max_batches: Optional cap on the number of batches (taken from the start).

  Returns:
    A list of ``(x, y)`` int32 arrays of shape ``(rows, seq_len)``.
  """
  tokens = np.asarray(tokens)
  _check_length(tokens, seq_len)
  starts = np.arange(0, len(tokens) - seq_len, seq_len)
  num_batches = max(len(starts) // batch_size, 1)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  return [
      _windows(tokens, starts[i * batch_size : (i + 1) * batch_size], seq_len)
      for i in range(num_batches)
  ]
