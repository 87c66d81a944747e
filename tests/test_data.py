"""Gaussian classification data and the byte-level corpus."""

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.data import (
    DEFAULT_MAX_BYTES,
    Corpus,
    CorpusChangedError,
    default_cache_dir,
    gaussian_classification,
)

MAX_BYTES = DEFAULT_MAX_BYTES


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def corpus(cache):
    return Corpus.stdlib(cache_dir=cache, max_bytes=MAX_BYTES)


def test_gaussian_classification_deterministic_and_shaped():
    X, y = gaussian_classification(50, 7, 5, seed=0)
    X2, y2 = gaussian_classification(50, 7, 5, seed=0)
    X3, _ = gaussian_classification(50, 7, 5, seed=1)
    assert X.shape == (50, 7) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(X, X2) and torch.equal(y, y2) and not torch.equal(X, X3)
    assert 0 <= int(y.min()) and int(y.max()) < 5
    X64, y64 = gaussian_classification(50, 7, 5, seed=0, dtype=torch.float64)
    assert X64.dtype == torch.float64 and torch.equal(X64.float(), X) and torch.equal(y64, y)


def test_gaussian_classification_refuses_integer_dtype():
    with pytest.raises(ValueError, match="floating dtype"):
        gaussian_classification(4, 3, 2, seed=0, dtype=torch.int64)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        gaussian_classification(4, 3, True, seed=0)


def test_gaussian_classification_teacher_labels_are_learnable():
    X, y = gaussian_classification(400, 10, 3, seed=0, dtype=torch.float64, labels="teacher")
    # A linear teacher's labels are linearly separable: a least-squares one-vs-rest fit
    # on one-hot targets recovers most of them (uniform labels would give ~ 1/3 + noise).
    W = torch.linalg.lstsq(X, torch.nn.functional.one_hot(y, 3).double()).solution
    assert ((X @ W).argmax(1) == y).double().mean() > 0.8
    with pytest.raises(ValueError, match="labels"):
        gaussian_classification(4, 2, 2, seed=0, labels="teach")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        gaussian_classification(4, 2, 0, seed=0)


def test_stdlib_corpus_content_and_split(corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    assert corpus.tokens.dtype == torch.uint8 and corpus.tokens.numel() == MAX_BYTES
    assert corpus.vocab_size == 256
    assert list(corpus.files) == sorted(corpus.files)
    assert all(f.endswith(".py") for f in corpus.files)
    assert not any(part in ("site-packages", "test") for f in corpus.files for part in f.split("/"))
    # The stream is the sorted files concatenated, cut at max_bytes.
    head = b"".join((root / f).read_bytes() for f in corpus.files)[:MAX_BYTES]
    assert bytes(corpus.tokens.numpy()) == head
    # Train and validation: adjacent, disjoint byte ranges split at a file boundary.
    assert corpus.train.numel() + corpus.val.numel() == corpus.tokens.numel()
    assert 0.85 < corpus.train.numel() / MAX_BYTES <= 0.95
    assert corpus.split_index in corpus.file_starts
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert set(corpus.train_files) | set(corpus.val_files) == set(corpus.files)
    first_val = (root / corpus.val_files[0]).read_bytes()
    assert bytes(corpus.val[: len(first_val)].numpy()) == first_val[: corpus.val.numel()]
    train_len = sum((root / f).stat().st_size for f in corpus.train_files)
    assert corpus.split_index == train_len
    text = corpus.describe()
    assert f"{MAX_BYTES:,}" in text and f"{corpus.val.numel():,}" in text and repr(corpus) == text


def test_cache_is_written_atomically_and_reused(corpus, cache):
    path = corpus.cache_path
    assert path.parent == cache and path.exists()
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())
    stamp = path.stat().st_mtime_ns
    again = Corpus.stdlib(cache_dir=cache, max_bytes=MAX_BYTES)
    assert again.from_cache and again.cache_path == path and path.stat().st_mtime_ns == stamp
    assert torch.equal(again.tokens, corpus.tokens) and again.split_index == corpus.split_index
    other = Corpus.stdlib(cache_dir=cache, max_bytes=MAX_BYTES // 2)
    assert other.cache_path != path and not other.from_cache
    assert torch.equal(other.tokens, corpus.tokens[: MAX_BYTES // 2])


@pytest.mark.parametrize("max_bytes", [100_000, 300_000, 1_000_000])
def test_small_caps_still_split_near_the_fraction(tmp_path, max_bytes):
    """Split at the nearest file start within 5% of 90%, else at exactly 90% of the bytes."""
    c = Corpus.stdlib(cache_dir=tmp_path, max_bytes=max_bytes)
    target = int(0.9 * max_bytes)
    assert abs(c.split_index - target) <= 0.05 * max_bytes
    shared = set(c.train_files) & set(c.val_files)
    if c.split_index in c.file_starts:
        assert not shared
    else:
        assert c.split_index == target and len(shared) == 1
        assert not any(
            target - 0.05 * max_bytes <= s <= target + 0.05 * max_bytes for s in c.file_starts
        )


def test_corrupt_cache_is_rebuilt(tmp_path):
    first = Corpus.stdlib(cache_dir=tmp_path, max_bytes=20_000)
    np.save(first.cache_path, np.zeros(5, dtype=np.uint8))
    rebuilt = Corpus.stdlib(cache_dir=tmp_path, max_bytes=20_000)
    assert not rebuilt.from_cache and torch.equal(rebuilt.tokens, first.tokens)
    first.cache_path.write_bytes(b"not an npy file")
    rebuilt = Corpus.stdlib(cache_dir=tmp_path, max_bytes=20_000)
    assert not rebuilt.from_cache and torch.equal(rebuilt.tokens, first.tokens)


def test_a_cache_that_cannot_be_written_warns_and_the_corpus_still_loads(tmp_path, monkeypatch):
    """The cache only saves time: a read-only home or a file in the cache's place must not stop
    the default corpus (it was a fatal 'cannot write ...; choose another path', naming no
    setting the user could change)."""
    good = Corpus.stdlib(cache_dir=tmp_path / "good", max_bytes=20_000)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would go")
    with pytest.warns(RuntimeWarning, match=r"cannot cache.*pass a writable cache_dir"):
        corpus = Corpus.stdlib(cache_dir=blocker, max_bytes=20_000)
    assert torch.equal(corpus.tokens, good.tokens) and corpus.split_index == good.split_index
    assert not corpus.from_cache and corpus.cache_path is None
    assert blocker.read_text() == "a file where the cache folder would go"
    monkeypatch.setenv("ADAM_MINI_LAB_CACHE", str(blocker))  # the default cache: name the setting
    with pytest.warns(RuntimeWarning, match=r"cannot cache.*set ADAM_MINI_LAB_CACHE to a writable"):
        assert Corpus.stdlib(max_bytes=20_000).cache_path is None


@pytest.mark.parametrize(
    ("ours", "xdg", "where"),
    [
        ("ours", "xdg", "ours"),
        ("", "xdg", "xdg/adam-mini-lab"),
        (None, "xdg", "xdg/adam-mini-lab"),
        (None, "", "home/.cache/adam-mini-lab"),  # empty: unset, not the working folder
        (None, "relative", "home/.cache/adam-mini-lab"),  # relative: ignored (XDG spec)
        (None, None, "home/.cache/adam-mini-lab"),
    ],
)
def test_kernel_and_corpus_tokens_share_one_cache_folder(monkeypatch, tmp_path, ours, xdg, where):
    """The compiled CPU kernel goes where the corpus tokens go, by one rule."""
    from optimizer import cpu_fused

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAM_MINI_LAB_NO_FUSED", raising=False)
    for var, value in (("ADAM_MINI_LAB_CACHE", ours), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            absolute = value and value != "relative"
            monkeypatch.setenv(var, str(tmp_path / value) if absolute else value)
    expected = tmp_path / where
    assert default_cache_dir() == expected
    corpus = Corpus.stdlib(max_bytes=20_000)
    assert corpus.cache_path is not None and corpus.cache_path.parent == expected
    cpu_fused.load.cache_clear()
    try:
        lib = cpu_fused.load()
        if lib is not None:  # no C compiler: the kernel has no file to place
            assert [p.parent for p in expected.glob("adam_mini_cpu_*.so")] == [expected]
    finally:
        cpu_fused.load.cache_clear()  # later tests load the kernel from the real cache again
    assert not list((tmp_path / "cwd").iterdir())  # nothing cached in the working folder


def test_batches_are_seeded_shifted_windows(corpus):
    x, y = corpus.batch("train", 8, 32, torch.Generator().manual_seed(0))
    x2, y2 = corpus.batch("train", 8, 32, torch.Generator().manual_seed(0))
    x3, _ = corpus.batch("train", 8, 32, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each row is a real window of the training bytes.
    train = bytes(corpus.train.numpy())
    for row_x, row_y in zip(x, y, strict=True):
        window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
        assert window in train

    a, b, c = (corpus.batches("val", 4, 16, seed=s) for s in (3, 3, 4))
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    gen = torch.Generator().manual_seed(3)
    first = corpus.batch("val", 4, 16, gen)
    assert torch.equal(first[0], next(corpus.batches("val", 4, 16, seed=3))[0])


def test_windows_never_cross_the_split():
    """Byte value = position: train windows stay below 40, val windows at or above."""
    corpus = Corpus(torch.arange(52, dtype=torch.uint8), 40, source="toy")
    gen = torch.Generator().manual_seed(0)
    train_starts, val_starts = set(), set()
    for _ in range(20):
        xt, yt = corpus.batch("train", 16, 10, gen)
        xv, yv = corpus.batch("val", 16, 10, gen)
        assert int(yt.max()) < 40 and int(xv.min()) >= 40
        train_starts |= set(xt[:, 0].tolist())
        val_starts |= set(xv[:, 0].tolist())
    # Every window start is drawn, the last one (len - context - 1) included.
    assert train_starts == set(range(40 - 10)) and val_starts == {40, 41}
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        corpus.batch("test", 1, 4, gen)
    with pytest.raises(ValueError, match="empty split"):
        Corpus(torch.arange(5, dtype=torch.uint8), 5, source="toy")


def test_from_file(tmp_path):
    path = tmp_path / "text.txt"
    text = "".join(f"line {i}: hello adam-mini\n" for i in range(100))
    path.write_text(text)
    corpus = Corpus.from_file(path)
    assert bytes(corpus.tokens.numpy()) == text.encode()
    assert corpus.val.numel() == len(text) - int(0.9 * len(text))
    x, y = corpus.batch("val", 2, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="fewer than context"):
        corpus.batch("val", 2, corpus.val.numel(), torch.Generator().manual_seed(0))


def test_from_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="0 bytes, too few"):
        Corpus.from_file(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Corpus.from_file(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="not a file"):
        Corpus.from_file(tmp_path)
    (tmp_path / "ok.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        Corpus.from_file(tmp_path / "ok.txt", val_fraction=1.0)


def test_stdlib_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        Corpus.stdlib(cache_dir=tmp_path, max_bytes=0)
    assert not os.listdir(tmp_path)


def test_from_file_refuses_a_binary_file_but_takes_any_text_encoding(tmp_path):
    """A file with NUL bytes (an .npy, a zip, a checkpoint) is refused, naming the fix, instead
    of training a 'text' model on it; text in any byte encoding is still read byte by byte."""
    binary = tmp_path / "tokens.npy"
    np.save(binary, np.arange(1000, dtype=np.int64))
    with pytest.raises(ValueError, match=r"NUL bytes.*not text.*give a text file"):
        Corpus.from_file(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café, naïve résumé\n".encode("latin-1") * 20)  # not UTF-8
    assert Corpus.from_file(latin1).tokens.numel() == latin1.stat().st_size


def test_stdlib_files_changing_while_read_is_its_own_error(monkeypatch, tmp_path):
    monkeypatch.setattr(Path, "read_bytes", lambda self: b"")  # emptied since it was listed
    with pytest.raises(CorpusChangedError, match=r"changed while reading.*retry when"):
        Corpus.stdlib(cache_dir=tmp_path, max_bytes=20_000)
    assert issubclass(CorpusChangedError, RuntimeError)  # callers catching RuntimeError still do
    assert not list(tmp_path.iterdir())  # nothing cached


def test_uniform_labels_use_every_class_evenly():
    _, y = gaussian_classification(5000, 2, 5, seed=0)
    counts = torch.bincount(y, minlength=5)
    assert len(counts) == 5 and int(counts.min()) > 1000 - 5 * 29  # 5 sd of Binomial(5000, 1/5)


def _fake_stdlib(tmp_path, monkeypatch, files):
    """A stdlib folder of ``files`` (relative path -> bytes) in place of the real one."""
    root = tmp_path / "stdlib"
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    return root


def test_stdlib_reads_python_source_only(tmp_path, monkeypatch):
    """Hidden folders, site-packages, test folders, _sysconfigdata and non-.py files stay out."""
    files = {
        name: name.encode() * 3
        for name in ["a.py", "pkg/c.py", "b.py", ".git/h.py", "_sysconfigdata_x.py",
                     "site-packages/s.py", "test/t.py", "pkg/notes.txt"]
    }  # fmt: skip
    _fake_stdlib(tmp_path, monkeypatch, files)
    corpus = Corpus.stdlib(cache_dir=tmp_path / "cache", max_bytes=None, val_fraction=0.4)
    assert corpus.files == ("a.py", "b.py", "pkg/c.py")
    assert bytes(corpus.tokens.numpy()) == b"".join(files[f] for f in corpus.files)


def test_stdlib_stops_at_the_file_that_reaches_max_bytes(tmp_path, monkeypatch):
    _fake_stdlib(tmp_path, monkeypatch, {f"{c}.py": c.encode() * 10 for c in "abc"})
    corpus = Corpus.stdlib(cache_dir=tmp_path / "cache", max_bytes=20, val_fraction=0.5)
    assert corpus.files == ("a.py", "b.py") and corpus.file_starts == (0, 10)
    assert corpus.split_index == 10 and corpus.val_files == ("b.py",)


@pytest.mark.parametrize(
    ("sizes", "val_fraction", "split"),
    [
        ([30, 18, 10, 42], 0.5, 48),  # starts 30, 48 and 58 lie near 50: the nearest
        ([30, 70], 0.9, 30),  # 0 is nearer to 10 than 30 but would leave no training bytes
    ],
)
def test_stdlib_splits_at_the_file_start_nearest_the_fraction(
    tmp_path, monkeypatch, sizes, val_fraction, split
):
    _fake_stdlib(tmp_path, monkeypatch, {f"f{i}.py": b"x" * n for i, n in enumerate(sizes)})
    corpus = Corpus.stdlib(cache_dir=tmp_path / "cache", max_bytes=None, val_fraction=val_fraction)
    assert corpus.split_index == split


def test_a_changed_stdlib_file_is_not_served_from_the_cache(tmp_path, monkeypatch):
    """Same total size after the cut, new content: the cache key holds the file sizes."""
    root = _fake_stdlib(tmp_path, monkeypatch, {"a.py": b"a" * 10, "b.py": b"b" * 10})
    cache = tmp_path / "cache"
    first = Corpus.stdlib(cache_dir=cache, max_bytes=15, val_fraction=0.5)
    (root / "a.py").write_bytes(b"c" * 12)
    again = Corpus.stdlib(cache_dir=cache, max_bytes=15, val_fraction=0.5)
    assert not again.from_cache and again.cache_path != first.cache_path
    assert bytes(again.tokens.numpy()) == b"c" * 12 + b"bbb"


def test_a_cache_file_of_another_dtype_is_rebuilt(tmp_path, monkeypatch):
    _fake_stdlib(tmp_path, monkeypatch, {"a.py": b"a" * 10, "b.py": b"b" * 10})
    first = Corpus.stdlib(cache_dir=tmp_path, max_bytes=None, val_fraction=0.5)
    np.save(first.cache_path, np.arange(20, dtype=np.int64))  # right length, not bytes
    rebuilt = Corpus.stdlib(cache_dir=tmp_path, max_bytes=None, val_fraction=0.5)
    assert not rebuilt.from_cache and torch.equal(rebuilt.tokens, first.tokens)


def test_corpus_and_batch_arguments_are_checked():
    tokens = torch.arange(50, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"1-D uint8 tensor, got torch.int64 \(50,\)"):
        Corpus(tokens.long(), 40, source="toy")
    with pytest.raises(ValueError, match=r"1-D uint8 tensor, got torch.uint8 \(5, 10\)"):
        Corpus(tokens.reshape(5, 10), 4, source="toy")
    with pytest.raises(ValueError, match="got 2 files but 1 file_starts"):
        Corpus(tokens, 40, source="toy", files=("a", "b"), file_starts=(0,))
    corpus = Corpus(tokens, 40, source="toy")
    for b, t in ((0, 4), (2, 0)):
        with pytest.raises(ValueError, match=f"must be positive, got {b}, {t}"):
            corpus.batch("train", b, t)
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        Corpus.stdlib(val_fraction=0.0)
    with pytest.raises(ValueError, match="max_bytes must be an int > 1 or None"):
        Corpus.stdlib(max_bytes=1e5)


def test_decode_reads_utf8():
    assert Corpus.decode(torch.tensor(list("café ∑".encode()))) == "café ∑"
    assert Corpus.decode(torch.tensor([0x66, 0xFF])) == "f\ufffd"


def test_arguments_of_the_wrong_type_are_named(tmp_path):
    """A float batch size failed inside torch.randint; exclude="test" excluded t, e and s."""
    corpus = Corpus(torch.arange(50, dtype=torch.uint8), 40, source="toy")
    with pytest.raises(ValueError, match="must be positive, got 2.5, 4: pass ints"):
        corpus.batch("train", 2.5, 4)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        corpus.batch("train", 2, 4, 0)
    with pytest.raises(TypeError, match="exclude must be a list of folder names, got 'test'"):
        Corpus.stdlib(cache_dir=tmp_path, exclude="test")
    with pytest.raises(TypeError, match="corpus file path must be a str or os.PathLike"):
        Corpus.from_file(None)
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        Corpus.from_file(tmp_path / "x.txt", val_fraction="0.1")
