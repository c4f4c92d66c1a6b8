# Copyright 2025 The slimoptax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""A small language-model toolkit for experiments, in the spirit of nanoGPT.

Everything here is deliberately small and offline:

* **Corpus** -- the Python standard library's own ``.py`` sources of the running
  interpreter (:func:`stdlib_corpus`), split deterministically into train and
  validation files by a hash of the relative path.
* **Tokenizer** -- a byte-level BPE trained locally with HF ``tokenizers``
  (:func:`train_tokenizer`), cached on disk, with a pure byte fallback
  (:class:`ByteTokenizer`, vocabulary 256).
* **Batches** -- random training windows (:func:`batch_iterator`) and
  deterministic contiguous evaluation windows (:func:`eval_batches`).
* **Models** -- a GPT-2 style transformer in Flax NNX (:class:`GPT`), the same
  model in Flax linen (:class:`LinenGPT`) and an embedding + linear head bigram
  model (:class:`EmbedHeadLM`), all built from Flax's standard layers only.
* **Training** -- :func:`train`, a jitted NNX training loop with warmup +
  cosine schedule, gradient clipping, evaluation, JSON-lines logs, per-parameter
  norm logging and a hook exposing the optax state.

Parameter paths
---------------
Optimizer presets match parameters by their path. For the NNX :class:`GPT`
(``attention="mha"``, ``tie_embeddings=True``) the ``"/"``-joined paths returned
by :func:`param_paths` / :func:`keypath_to_str` are::

  wte/embedding                  (vocab_size, d_model)
  wpe/embedding                  (seq_len, d_model)
  blocks/0/ln_1/scale            (d_model,)
  blocks/0/attn/query/kernel     (d_model, n_heads, head_dim)
  blocks/0/attn/key/kernel       (d_model, n_heads, head_dim)
  blocks/0/attn/value/kernel     (d_model, n_heads, head_dim)
  blocks/0/attn/out/kernel       (n_heads, head_dim, d_model)
  blocks/0/ln_2/scale            (d_model,)
  blocks/0/mlp/up/kernel         (d_model, 4 d_model)
  blocks/0/mlp/down/kernel       (4 d_model, d_model)
  ...
  ln_f/scale                     (d_model,)
  lm_head/kernel                 (d_model, vocab_size)   only if tie_embeddings=False

With ``attention="dense"`` the attention parameters are
``blocks/<i>/attn/{q_proj,k_proj,v_proj,o_proj}/kernel``, each ``(d_model, d_model)``.
:class:`EmbedHeadLM` has ``wte/embedding`` and ``lm_head/kernel``.
The block index is an ``int`` key (``DictKey(0)``), not a string.

How ``nnx.Optimizer`` (flax 0.12.8) hands the tree to optax:

* ``tx.init`` receives ``nnx.state(model, nnx.Param)``: an ``nnx.State`` whose
  leaves are ``nnx.Param`` *Variables*. ``nnx.Param`` is itself a pytree node, so
  ``jax.tree_util.tree_flatten_with_path`` reaches the arrays with a trailing
  ``GetAttrKey('value')``: ``['blocks'][0]['attn']['query']['kernel'].value``.
* ``tx.update`` receives ``nnx.as_pure(...)`` trees (grads, state and params) in
  which the leaves are plain ``jax.Array`` and there is no trailing ``.value``:
  ``['blocks'][0]['attn']['query']['kernel']``.

Label functions (e.g. for ``optax.multi_transform`` / ``optax.masked``) must
therefore ignore a trailing ``.value``; :func:`keypath_to_str` does exactly
that. Keys of ``nnx.State`` are kept sorted, so leaf order is alphabetical
(``blocks`` < ``ln_f`` < ``wpe`` < ``wte``), not definition order.

For :class:`LinenGPT` the variables are a plain nested dict, so the paths are
``params/wte/embedding``, ``params/blocks_0/attn/query/kernel``,
``params/blocks_0/mlp/down/kernel``, ``params/ln_f/scale`` and so on (linen
names list members ``blocks_0``, ``blocks_1``, ...). The shapes are the same as
in NNX.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slimoptax import _tree
from slimoptax import diagnostics as diagnostics_lib

try:  # Optional dependency (the ``experiments`` extra).
  import tokenizers as hf_tokenizers
except ImportError:  # pragma: no cover - exercised only without the extra.
  hf_tokenizers = None

try:  # Optional dependency (the ``experiments`` extra).
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised only without the extra.
  tqdm = None

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "EmbedHeadConfig",
    "EmbedHeadLM",
    "END_OF_TEXT",
    "GPT",
    "GPTConfig",
    "LinenGPT",
    "PRESETS",
    "Tokenizer",
    "batch_iterator",
    "build_model",
    "count_params",
    "cross_entropy_loss",
    "default_cache_dir",
    "encode_corpus",
    "eval_batches",
    "gpt_config",
    "keypath_to_str",
    "param_paths",
    "prepare_data",
    "split_train_val",
    "stdlib_corpus",
    "stdlib_source_files",
    "train",
    "train_tokenizer",
    "tree_bytes",
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


_make_eval_batches = eval_batches  # `train` has a keyword argument of the same name.


# -----------------------------------------------------------------------------
# Models
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyperparameters of :class:`GPT` and :class:`LinenGPT`.

  Attributes:
    vocab_size: Embedding rows; must be >= the tokenizer's vocabulary size.
    seq_len: Maximum context length (rows of the positional embedding).
    n_layers: Number of transformer blocks.
    n_heads: Attention heads (``d_model`` must be divisible by it).
    d_model: Residual stream width.
    tie_embeddings: Whether the output projection reuses ``wte``; if False a
      separate ``lm_head`` (d_model, vocab_size) is added.
    attention: ``"mha"`` for ``nnx.MultiHeadAttention`` (3-D kernels) or
      ``"dense"`` for four ``(d_model, d_model)`` ``nnx.Linear`` projections.
    init_std: Std of all weight matrices; residual projections use
      ``init_std / sqrt(2 n_layers)``.
    dtype: Name of the computation dtype, e.g. ``"bfloat16"`` (parameters are
      always float32). A string keeps the config JSON-serializable.
  """

  vocab_size: int = 50304
  seq_len: int = 1024
  n_layers: int = 12
  n_heads: int = 12
  d_model: int = 768
  tie_embeddings: bool = True
  attention: str = "mha"
  init_std: float = 0.02
  dtype: str = "float32"

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}.")
    if self.attention not in ("mha", "dense"):
      raise ValueError(f"attention must be 'mha' or 'dense', got {self.attention!r}.")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def residual_init_std(self) -> float:
    """Std of the residual projections (attention out, MLP down)."""
    return self.init_std / math.sqrt(2 * self.n_layers)


PRESETS: dict[str, GPTConfig] = {
    # ~0.1M parameters: a few hundred steps in about a minute on 2 CPU cores.
    "tiny": GPTConfig(vocab_size=512, seq_len=64, n_layers=2, n_heads=4, d_model=64),
    # ~1.3M parameters: a few minutes on 2 CPU cores.
    "small_cpu": GPTConfig(vocab_size=2048, seq_len=128, n_layers=4, n_heads=4, d_model=128),
    # GPT-2 small (124M): accelerator runs and shape tests only.
    "gpt2_small": GPTConfig(vocab_size=50304, seq_len=1024, n_layers=12, n_heads=12, d_model=768),
}


def gpt_config(name: str, **overrides: Any) -> GPTConfig:
  """Returns the preset ``name`` (see :data:`PRESETS`) with fields overridden.

  Args:
    name: ``"tiny"``, ``"small_cpu"`` or ``"gpt2_small"``.
    **overrides: ``GPTConfig`` fields to replace, e.g. ``vocab_size=256``.

  Returns:
    A new :class:`GPTConfig`.
  """
  if name not in PRESETS:
    raise KeyError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


@dataclasses.dataclass(frozen=True)
class EmbedHeadConfig:
  """Hyperparameters of :class:`EmbedHeadLM`.

  Attributes:
    vocab_size: Vocabulary size.
    d_model: Embedding width.
    seq_len: Context length used for training batches (the model itself is
      position-free).
    init_std: Std of both weight matrices.
  """

  vocab_size: int = 512
  d_model: int = 64
  seq_len: int = 64
  init_std: float = 0.02


def _normal(std: float) -> Callable[..., jax.Array]:
  return nnx.initializers.normal(stddev=std)


def _linear(config: GPTConfig, in_features: int, out_features: int, *, std: float, rngs: nnx.Rngs):
  """A bias-free ``nnx.Linear`` with N(0, std^2) kernel."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=False,
      kernel_init=_normal(std),
      dtype=config.compute_dtype,
      rngs=rngs,
  )


class DenseCausalSelfAttention(nnx.Module):
  """Causal self-attention with four ``(d_model, d_model)`` ``nnx.Linear`` projections."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d, std = config.d_model, config.init_std
    self.q_proj = _linear(config, d, d, std=std, rngs=rngs)
    self.k_proj = _linear(config, d, d, std=std, rngs=rngs)
    self.v_proj = _linear(config, d, d, std=std, rngs=rngs)
    self.o_proj = _linear(config, d, d, std=config.residual_init_std, rngs=rngs)
    self.n_heads = config.n_heads

  def __call__(self, x: jax.Array, *, mask: jax.Array) -> jax.Array:
    heads = lambda t: t.reshape(*t.shape[:-1], self.n_heads, -1)
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    y = nnx.dot_product_attention(q, k, v, mask=mask)
    return self.o_proj(y.reshape(x.shape))


class MLP(nnx.Module):
  """``down(gelu(up(x)))`` with a 4x hidden width and no biases."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.up = _linear(config, d, 4 * d, std=config.init_std, rngs=rngs)
    self.down = _linear(config, 4 * d, d, std=config.residual_init_std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.ln_1 = nnx.LayerNorm(d, use_bias=False, dtype=config.compute_dtype, rngs=rngs)
    if config.attention == "mha":
      self.attn = nnx.MultiHeadAttention(
          num_heads=config.n_heads,
          in_features=d,
          use_bias=False,
          kernel_init=_normal(config.init_std),
          out_kernel_init=_normal(config.residual_init_std),
          decode=False,
          dtype=config.compute_dtype,
          rngs=rngs,
      )
    else:
      self.attn = DenseCausalSelfAttention(config, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(d, use_bias=False, dtype=config.compute_dtype, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask=mask)
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """A GPT-2 style decoder built from Flax NNX standard layers.

  See the module docstring for parameter names and shapes. Initialization
  follows the SlimAdam paper (Mitchell/OLMo style): every weight matrix and
  embedding ~ N(0, init_std^2), residual projections (``attn/out`` or
  ``attn/o_proj``, ``mlp/down``) ~ N(0, init_std^2 / (2 n_layers)), LayerNorm
  scales 1, no biases anywhere.

  Args:
    config: Model hyperparameters.
    rngs: Parameter RNGs.
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, std = config.d_model, config.init_std
    embed = functools.partial(
        nnx.Embed, embedding_init=_normal(std), dtype=config.compute_dtype, rngs=rngs
    )
    self.wte = embed(config.vocab_size, d)
    self.wpe = embed(config.seq_len, d)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.ln_f = nnx.LayerNorm(d, use_bias=False, dtype=config.compute_dtype, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _linear(config, d, config.vocab_size, std=std, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``."""
    positions = jnp.arange(tokens.shape[-1])
    x = self.wte(tokens) + self.wpe(positions)
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask=mask)
    x = self.ln_f(x)
    if self.config.tie_embeddings:
      return self.wte.attend(x)
    return self.lm_head(x)


class EmbedHeadLM(nnx.Module):
  """The 2-layer bigram model ``lm_head(wte(tokens))`` (no tying, no biases).

  Used for the vocabulary-size experiment of the SlimAdam paper (Sec. 4.1).

  Args:
    config: Model hyperparameters.
    rngs: Parameter RNGs.
  """

  def __init__(self, config: EmbedHeadConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = _normal(config.init_std)
    self.wte = nnx.Embed(config.vocab_size, config.d_model, embedding_init=init, rngs=rngs)
    self.lm_head = nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, kernel_init=init, rngs=rngs
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``."""
    return self.lm_head(self.wte(tokens))


def build_model(config: GPTConfig | EmbedHeadConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds :class:`GPT` or :class:`EmbedHeadLM` depending on the config type."""
  if isinstance(config, GPTConfig):
    return GPT(config, rngs=rngs)
  if isinstance(config, EmbedHeadConfig):
    return EmbedHeadLM(config, rngs=rngs)
  raise TypeError(f"Unknown model config type {type(config).__name__}.")


# --- linen ------------------------------------------------------------------


def _dense(config: GPTConfig, features: int, *, std: float, name: str) -> nn.Dense:
  """A bias-free ``nn.Dense`` with N(0, std^2) kernel."""
  return nn.Dense(
      features,
      use_bias=False,
      kernel_init=_normal(std),
      dtype=config.compute_dtype,
      name=name,
  )


class _LinenMLP(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = jax.nn.gelu(_dense(c, 4 * c.d_model, std=c.init_std, name="up")(x))
    return _dense(c, c.d_model, std=c.residual_init_std, name="down")(x)


class _LinenDenseAttention(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x, *, mask):
    c = self.config
    heads = lambda t: t.reshape(*t.shape[:-1], c.n_heads, -1)
    q = heads(_dense(c, c.d_model, std=c.init_std, name="q_proj")(x))
    k = heads(_dense(c, c.d_model, std=c.init_std, name="k_proj")(x))
    v = heads(_dense(c, c.d_model, std=c.init_std, name="v_proj")(x))
    y = nn.dot_product_attention(q, k, v, mask=mask)
    return _dense(c, c.d_model, std=c.residual_init_std, name="o_proj")(y.reshape(x.shape))


class _LinenBlock(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x, *, mask):
    c = self.config
    if c.attention == "mha":
      attn = nn.MultiHeadDotProductAttention(
          num_heads=c.n_heads,
          qkv_features=c.d_model,
          use_bias=False,
          kernel_init=_normal(c.init_std),
          out_kernel_init=_normal(c.residual_init_std),
          deterministic=True,
          decode=False,
          dtype=c.compute_dtype,
          name="attn",
      )
    else:
      attn = _LinenDenseAttention(c, name="attn")
    ln_1 = nn.LayerNorm(use_bias=False, dtype=c.compute_dtype, name="ln_1")
    ln_2 = nn.LayerNorm(use_bias=False, dtype=c.compute_dtype, name="ln_2")
    x = x + attn(ln_1(x), mask=mask)
    return x + _LinenMLP(c, name="mlp")(ln_2(x))


class LinenGPT(nn.Module):
  """The :class:`GPT` model in Flax linen (same layers, names and init).

  Variables live under ``params/`` with blocks named ``blocks_0``,
  ``blocks_1``, ...; e.g. ``params/blocks_0/attn/query/kernel``.

  Attributes:
    config: Model hyperparameters.
  """

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``."""
    c = self.config
    embed = functools.partial(
        nn.Embed, embedding_init=_normal(c.init_std), dtype=c.compute_dtype
    )
    wte = embed(c.vocab_size, c.d_model, name="wte")
    wpe = embed(c.seq_len, c.d_model, name="wpe")
    x = wte(tokens) + wpe(jnp.arange(tokens.shape[-1]))
    mask = nn.make_causal_mask(tokens)
    for i in range(c.n_layers):
      x = _LinenBlock(c, name=f"blocks_{i}")(x, mask=mask)
    x = nn.LayerNorm(use_bias=False, dtype=c.compute_dtype, name="ln_f")(x)
    if c.tie_embeddings:
      return wte.attend(x)
    return _dense(c, c.vocab_size, std=c.init_std, name="lm_head")(x)


# -----------------------------------------------------------------------------
# Parameter utilities and loss
# -----------------------------------------------------------------------------


# The "/"-joined path of a key path (a trailing nnx `.value` dropped): the same strings the
# label rules match.
keypath_to_str = _tree.path_str


def _named_leaves(tree: Any) -> dict[str, jax.Array]:
  return {keypath_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_paths(params: Any) -> dict[str, tuple[int, ...]]:
  """Returns ``{path: shape}`` for an NNX module or any params pytree.

  Args:
    params: An ``nnx.Module`` (its ``nnx.Param`` state is used) or a pytree
      such as linen ``variables``.

  Returns:
    A dict from ``"/"``-joined path to shape, in flattening order.
  """
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return {path: tuple(x.shape) for path, x in _named_leaves(params).items()}


def count_params(params: Any) -> int:
  """Total number of parameter entries of an NNX module or a params pytree."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


tree_bytes = diagnostics_lib.tree_bytes


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy, computed in float32.

  Args:
    logits: ``(..., vocab_size)`` unnormalized log-probabilities.
    targets: ``(...)`` integer labels.

  Returns:
    A scalar: the mean loss over all positions.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses.mean()


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


def _leaf_norms(tree: Any) -> dict[str, jax.Array]:
  return {
      path: jnp.linalg.norm(x.astype(jnp.float32).ravel())
      for path, x in _named_leaves(tree).items()
  }


@nnx.jit
def _train_step(model, optimizer, x, y):
  """One optimizer step; returns the loss and per-parameter L2 norms."""
  loss, grads = nnx.value_and_grad(lambda m: cross_entropy_loss(m(x), y))(model)
  updates = optimizer.update(model, grads)
  norms = {
      "grad": _leaf_norms(nnx.as_pure(grads)),
      "weight": _leaf_norms(nnx.as_pure(nnx.state(model, nnx.Param))),
      "update": _leaf_norms(updates),
  }
  return loss, norms


@nnx.jit
def _eval_step(model, x, y):
  return cross_entropy_loss(model(x), y)


def _mean_eval_loss(model: nnx.Module, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
  losses = [_eval_step(model, x, y) for x, y in batches]
  return float(np.mean(jax.device_get(losses)))


def _hook_step_set(state_hook_steps: int | Iterable[int] | None, steps: int) -> frozenset[int]:
  if state_hook_steps is None:
    return frozenset()
  if isinstance(state_hook_steps, int):
    return frozenset(range(state_hook_steps, steps + 1, state_hook_steps))
  return frozenset(state_hook_steps)


def train(
    model_config: GPTConfig | EmbedHeadConfig | nnx.Module,
    tx_factory: Callable[[optax.Schedule], optax.GradientTransformation],
    *,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    seed: int = 0,
    seq_len: int | None = None,
    eval_every: int = 100,
    eval_batches: int | None = 20,
    log_every: int = 10,
    norm_log_every: int | None = None,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    state_hook: Callable[[int, Any], None] | None = None,
    state_hook_steps: int | Iterable[int] | None = None,
    clip_norm: float | None = 1.0,
    final_lr_fraction: float = 0.1,
) -> dict[str, Any]:
  """Trains a language model on a token stream with an optax optimizer.

  The learning rate warms up linearly from 0 to ``lr`` over ``warmup`` steps
  and then follows a cosine decay to ``lr * final_lr_fraction`` at ``steps``
  (``optax.warmup_cosine_decay_schedule``). The transformation applied is
  ``optax.chain(optax.clip_by_global_norm(clip_norm), tx_factory(schedule))``;
  weight decay, if any, is the business of ``tx_factory``. The model is
  updated by ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` inside an ``nnx.jit``
  train step.

  Logging: a record (a JSON-serializable dict) is produced at step 0 and every
  ``log_every``/``eval_every``/``norm_log_every`` steps and at the last step,
  with keys ``step``, ``lr`` (the rate used by that step's update),
  ``wall_time`` (seconds since start) and, when available, ``train_loss``
  (mean over the steps since the previous record), ``grad_norm`` (of that
  step's gradient, before clipping), ``val_loss`` (on eval steps) and
  ``norms`` (on norm-log steps: ``{path: {"grad": .., "weight": .., "update": ..}}`` L2 norms of the
  raw gradient, the parameter after the update and the applied update).
  Records go to ``log_fn``, to ``log_path`` as JSON lines, and into
  ``result["history"]``. The per-parameter norms are computed inside every
  jitted step (cheap reductions) but copied to the host only when logged.

  Args:
    model_config: A :class:`GPTConfig`, an :class:`EmbedHeadConfig`, or an
      already built NNX module (mapping tokens to logits).
    tx_factory: Called with the learning-rate schedule; returns the optimizer.
    train_tokens: 1-D training token stream.
    val_tokens: 1-D validation token stream.
    steps: Number of optimizer updates.
    batch_size: Sequences per batch.
    lr: Peak learning rate.
    warmup: Linear warmup steps.
    seed: Seed for parameter init (``nnx.Rngs(seed)``) and batch sampling.
    seq_len: Sequence length; defaults to ``model_config.seq_len``.
    eval_every: Evaluate every this many steps (and at steps 0 and ``steps``).
    eval_batches: Maximum number of validation batches per evaluation.
    log_every: Emit a training-loss record every this many steps.
    norm_log_every: Log per-parameter norms every this many steps (None: off).
    log_fn: Optional callback receiving each record.
    log_path: Optional JSON-lines file for the records (appended to).
    progress: Whether to show a tqdm progress bar.
    state_hook: Optional ``state_hook(step, opt_state)``, called after the
      update of each step in ``state_hook_steps`` (step 0: before training).
      ``opt_state`` is the pure optax state of the optimizer built by
      ``tx_factory`` (without the clipping wrapper), i.e. a pytree of
      ``jax.Array`` with the pure paths described in the module docstring.
    state_hook_steps: An int ``k`` (every ``k`` steps) or a collection of steps.
    clip_norm: Global-norm clipping threshold; None disables clipping.
    final_lr_fraction: Final learning rate as a fraction of ``lr``.

  Returns:
    A dict with ``final_val_loss``, ``final_train_loss``, ``history`` (list of
    records), ``wall_time`` (total seconds), ``seconds_per_step`` (after the
    first, compiling, step; evaluation excluded), ``num_params``,
    ``param_bytes``, ``opt_state_bytes`` (the whole optimizer state) and the
    trained ``model`` and ``optimizer`` (not JSON-serializable).
  """
  start_time = time.perf_counter()
  if isinstance(model_config, nnx.Module):
    model = model_config
  else:
    model = build_model(model_config, rngs=nnx.Rngs(seed))
  seq_len = seq_len if seq_len is not None else model.config.seq_len

  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warmup,
      decay_steps=steps,
      end_value=lr * final_lr_fraction,
  )
  clip = optax.clip_by_global_norm(clip_norm) if clip_norm is not None else optax.identity()
  optimizer = nnx.Optimizer(model, optax.chain(clip, tx_factory(schedule)), wrt=nnx.Param)

  batches = batch_iterator(train_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed)
  val_batches = _make_eval_batches(
      val_tokens, batch_size=batch_size, seq_len=seq_len, max_batches=eval_batches
  )
  hook_steps = _hook_step_set(state_hook_steps, steps) if state_hook is not None else frozenset()
  log_file = open(log_path, "a") if log_path is not None else None
  history: list[dict[str, Any]] = []

  def emit(record: dict[str, Any]) -> None:
    history.append(record)
    if log_fn is not None:
      log_fn(record)
    if log_file is not None:
      log_file.write(json.dumps(record) + "\n")
      log_file.flush()

  def call_hook(step: int) -> None:
    if step in hook_steps:
      state_hook(step, nnx.as_pure(optimizer.opt_state)[1])

  eval_time = 0.0

  def evaluate() -> float:
    nonlocal eval_time
    t0 = time.perf_counter()
    loss = _mean_eval_loss(model, val_batches)
    eval_time += time.perf_counter() - t0
    return loss

  val_loss = evaluate()
  elapsed = time.perf_counter() - start_time
  emit({"step": 0, "lr": float(schedule(0)), "val_loss": val_loss, "wall_time": elapsed})
  call_hook(0)

  # `cached_partial` skips re-traversing the model/optimizer graphs on every call.
  train_step = nnx.cached_partial(_train_step, model, optimizer)
  pending_losses: list[jax.Array] = []
  train_loss = float("nan")
  first_step_done = None
  bar = tqdm(total=steps, disable=not progress, dynamic_ncols=True) if tqdm is not None else None
  try:
    for step in range(1, steps + 1):
      x, y = next(batches)
      loss, norms = train_step(x, y)
      pending_losses.append(loss)
      if step == 1:
        jax.block_until_ready(loss)
        first_step_done = time.perf_counter()
        eval_time_before_first_step = eval_time
      call_hook(step)

      is_last = step == steps
      do_eval = step % eval_every == 0 or is_last
      do_norms = norm_log_every is not None and (step % norm_log_every == 0 or is_last)
      if not (step % log_every == 0 or do_eval or do_norms or is_last):
        if bar is not None:
          bar.update(1)
        continue

      train_loss = float(np.mean(jax.device_get(pending_losses)))
      pending_losses = []
      host_norms = jax.device_get(norms)
      record = {
          "step": step,
          "train_loss": train_loss,
          "lr": float(schedule(step - 1)),
          "grad_norm": float(np.sqrt(sum(float(g) ** 2 for g in host_norms["grad"].values()))),
      }
      if do_eval:
        val_loss = record["val_loss"] = evaluate()
      if do_norms:
        record["norms"] = {
            path: {kind: float(host_norms[kind][path]) for kind in ("grad", "weight", "update")}
            for path in host_norms["grad"]
        }
      record["wall_time"] = time.perf_counter() - start_time
      emit(record)
      if bar is not None:
        bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
    if log_file is not None:
      log_file.close()

  end_time = time.perf_counter()
  timed_steps = steps - 1
  seconds_per_step = (
      (end_time - first_step_done - (eval_time - eval_time_before_first_step)) / timed_steps
      if timed_steps > 0 else float("nan")
  )
  return {
      "final_val_loss": val_loss,
      "final_train_loss": train_loss,
      "history": history,
      "wall_time": end_time - start_time,
      "seconds_per_step": seconds_per_step,
      "num_params": count_params(model),
      "param_bytes": tree_bytes(nnx.as_pure(nnx.state(model, nnx.Param))),
      "opt_state_bytes": tree_bytes(nnx.as_pure(optimizer.opt_state)),
      "model": model,
      "optimizer": optimizer,
  }
