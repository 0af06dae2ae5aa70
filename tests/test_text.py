"""data=text: byte-level text from a file, a folder or the default corpus, nanoGPT's .bin files,
their windows, the validation split, and the errors of bad inputs."""

from __future__ import annotations

import hashlib
import os
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from distsgd import data, text
from distsgd.config import ConfigError, DataConfig
from distsgd.distributed import Dist

CPU = torch.device("cpu")
# Non-ASCII on purpose: byte-level tokens are the UTF-8 bytes, not the characters.
PROSE = "Sing, goddess, the anger of Péleus' son Achilleus, and its devastation. " * 12


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache/distsgd/text"


def _windows(dataset: data.Dataset, part: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor(idx)
    return getattr(dataset, f"x_{part}")[index], getattr(dataset, f"y_{part}")[index]


def test_a_text_file_gives_consecutive_windows_and_a_disjoint_validation_tail(tmp_path):
    raw = PROSE.encode()
    (tmp_path / "iliad.txt").write_bytes(raw)
    block = 16
    cfg = DataConfig(name="text", path=str(tmp_path / "iliad.txt"), block_size=block, val_fraction=0.25)
    dataset = data.load(cfg)
    split = len(raw) - round(len(raw) * 0.25)
    assert (dataset.task, dataset.num_outputs, dataset.input_shape, dataset.bytes_per_token) == (
        "language_model", 256, (block,), 1.0)
    assert (len(dataset.x_train), len(dataset.x_val)) == ((split - 1) // block, (len(raw) - split - 1) // block)
    assert data.train_size(cfg) == len(dataset.x_train)
    tokens = torch.tensor(list(raw))
    x, y = _windows(dataset, "train", [5, 0, len(dataset.x_train) - 1])  # in the order asked
    for row, i in enumerate([5, 0, len(dataset.x_train) - 1]):
        assert torch.equal(x[row], tokens[i * block:(i + 1) * block])
        assert torch.equal(y[row], tokens[i * block + 1:(i + 1) * block + 1])
    assert x.dtype == y.dtype == torch.int64
    # The last training target lies before the split; every validation token (targets too) after it.
    assert (len(dataset.x_train) * block + 1) <= split
    xv, yv = _windows(dataset, "val", list(range(len(dataset.x_val))))
    assert torch.equal(xv.flatten(), tokens[split:split + len(dataset.x_val) * block])
    assert torch.equal(yv.flatten(), tokens[split + 1:split + 1 + len(dataset.x_val) * block])
    # Held on the device (one copy of the tokens, shared by x, y and both parts) and streamed
    # from the file through a DataLoader, a rank's batches are the same; each global batch is
    # the same windows with one rank or two.
    placed, streamed = dataset.place(CPU, True, 0), dataset.place(CPU, False, 0)
    assert placed.x_train.tokens is placed.y_val.tokens and placed.x_train.tokens.array.dtype == torch.uint8
    args = dict(epoch=1, first=1, steps=4, batch=8, seed=3)
    one = list(placed.train_batches(dist=Dist(0, 1, 0, CPU), **args))
    two = [list(streamed.train_batches(dist=Dist(r, 2, r, CPU), **{**args, "batch": 4})) for r in (0, 1)]
    assert len(one) == 3
    for k, (xb, yb) in enumerate(one):
        both = [torch.cat([two[0][k][i], two[1][k][i]]) for i in (0, 1)]
        assert sorted(map(tuple, both[0].tolist())) == sorted(map(tuple, xb.tolist()))
        assert torch.equal(both[1][:, :-1], both[0][:, 1:])  # y is x shifted by one
    # A DataLoader worker started by spawn gets a pickled copy: it maps the file anew.
    copy = pickle.loads(pickle.dumps(dataset.x_train))
    assert isinstance(copy.tokens.array, np.memmap) and torch.equal(copy[torch.tensor([3])], dataset.x_train[torch.tensor([3])])


def test_a_folder_is_its_files_in_path_order_concatenated_once_into_the_cache(tmp_path, own_cache, caplog):
    folder = tmp_path / "corpus"
    for name, body in [("b/2.txt", "second\n"), ("a.txt", "first\n"), ("c.txt", "third\n"), (".notes", "hidden\n"),
                       ("b/.git/HEAD", "ref\n")]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(body)
    cfg = DataConfig(name="text", path=str(folder), block_size=4, val_fraction=0)
    with caplog.at_level("INFO", logger="distsgd"):
        dataset = data.load(cfg)
    joined = b"first\nsecond\nthird\n"
    digest = hashlib.sha256(joined).hexdigest()
    cached = own_cache / f"{digest}.bytes"
    assert cached.read_bytes() == joined and dataset.x_train.tokens.path == cached
    assert [line.split("\t")[1] for line in (own_cache / f"{digest}.txt").read_text().splitlines()[2:]] == [
        str(folder / n) for n in ("a.txt", "b/2.txt", "c.txt")]
    assert f"3 files (a.txt, b/2.txt, c.txt); {len(joined)} bytes, sha256 {digest[:16]}" in caplog.text
    x, y = _windows(dataset, "train", [0, 1, 2, 3])
    assert bytes(x.flatten().tolist()) == joined[:16] and bytes(y.flatten().tolist()) == joined[1:17]
    assert (len(dataset.x_val), data.train_size(cfg)) == (0, 4)
    # Read again, the cache is used as it is; a changed file is a new hash and a new file.
    os.utime(cached, (0, 0))
    data.load(cfg)
    assert cached.stat().st_mtime == 0
    (folder / "c.txt").write_text("third, changed\n")
    changed = data.load(cfg)
    assert changed.x_train.tokens.path != cached and cached.read_bytes() == joined


def test_a_cache_that_cannot_be_written_and_files_that_change_are_one_error_and_leave_no_part(tmp_path, own_cache,
                                                                                             monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first\n")
    (folder / "b.txt").write_text("second\n")
    cfg = DataConfig(name="text", path=str(folder), block_size=4, val_fraction=0)
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text("a file where the cache folder belongs")  # root ignores permissions
    with pytest.raises(ConfigError, match=f"data.path: cannot write the concatenated text into {own_cache} .*"
                                          "set XDG_CACHE_HOME"):
        data.load(cfg)
    own_cache.unlink()
    hashed = text.checked_text
    monkeypatch.setattr(text, "checked_text", lambda files: ("0" * 64, hashed(files)[1]))  # as if b.txt changed since
    with pytest.raises(ConfigError, match="the files changed while they were read"):
        data.load(cfg)
    assert list(own_cache.iterdir()) == []


def test_the_default_corpus_is_a_fixed_list_of_stdlib_modules_read_the_same_twice(own_cache, caplog):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = text.default_corpus_files()
    assert [f.relative_to(stdlib).as_posix().removesuffix("/__init__.py").removesuffix(".py") for f in files] == \
        list(text.DEFAULT_CORPUS)
    assert len(text.DEFAULT_CORPUS) == 31 and text.DEFAULT_CORPUS[0] == "argparse"
    joined = b"".join(f.read_bytes() for f in files)
    cfg = DataConfig(name="text", block_size=128, val_fraction=0.1)
    with caplog.at_level("INFO", logger="distsgd"):
        first, second = data.load(cfg), data.load(cfg)
    digest = hashlib.sha256(joined).hexdigest()
    assert not own_cache.exists()  # held in memory: a machine needs no writable folder for it
    assert caplog.text.count(f"sha256 {digest[:16]}") == 2 and "31 modules of Python 3." in caplog.text
    every = torch.arange(len(first.x_val))
    assert torch.equal(first.x_val[every], second.x_val[every])
    assert torch.equal(first.x_train[torch.tensor([0, 7])].flatten(), torch.tensor(list(joined[:128]) +
                                                                                    list(joined[7 * 128:8 * 128])))
    assert len(first.x_train) == data.train_size(cfg) > 10_000


def _prepare_like_nanogpt(folder: Path, corpus: str, meta: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """What nanoGPT's data/shakespeare_char/prepare.py writes: uint16 ids by ndarray.tofile, the
    first 90% of the text for training, and meta.pkl holding vocab_size, itos and stoi."""
    folder.mkdir()
    chars = sorted(set(corpus))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))
    n = len(corpus)
    ids = [np.array([stoi[c] for c in part], dtype=np.uint16) for part in (corpus[:int(n * 0.9)], corpus[int(n * 0.9):])]
    ids[0].tofile(folder / "train.bin")
    ids[1].tofile(folder / "val.bin")
    if meta:
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return ids[0], ids[1], itos


def test_nanogpt_bins_are_read_with_the_vocabulary_of_meta_pkl(tmp_path):
    corpus = PROSE * 3
    train_ids, val_ids, itos = _prepare_like_nanogpt(tmp_path / "char", corpus)
    block = 32
    cfg = DataConfig(name="text", root=str(tmp_path / "char"), block_size=block)
    dataset = data.load(cfg)
    assert (dataset.num_outputs, len(dataset.x_train), len(dataset.x_val)) == (
        len(itos), (len(train_ids) - 1) // block, (len(val_ids) - 1) // block)
    assert data.train_size(cfg) == len(dataset.x_train)
    x, y = _windows(dataset, "val", [2])
    assert torch.equal(y[0], torch.from_numpy(val_ids[2 * block + 1:3 * block + 1].astype(np.int64)))
    assert b"".join(dataset.token_bytes[i] for i in x[0].tolist()).decode() == "".join(itos[i] for i in x[0].tolist())
    # "é" is two bytes: bytes per token over exactly the validation targets.
    targets = val_ids[1:1 + len(dataset.x_val) * block]
    assert dataset.bytes_per_token == pytest.approx(np.mean([len(itos[i].encode()) for i in targets]), abs=1e-12)
    assert dataset.bytes_per_token > 1
    placed = dataset.place(CPU, True, 0)
    assert placed.x_train.tokens.array.dtype == torch.int32 and torch.equal(placed.x_val[torch.tensor([2])], x)
    # data.vocab_size may pad the vocabulary (as nanoGPT's 50304 does), not shrink it.
    assert data.load(DataConfig(name="text", root=cfg.root, block_size=block, vocab_size=64)).num_outputs == 64
    with pytest.raises(ConfigError, match=f"data.vocab_size=8 is smaller than the vocabulary {len(itos)}"):
        data.load(DataConfig(name="text", root=cfg.root, block_size=block, vocab_size=8))


def test_nanogpt_bins_without_meta_need_data_vocab_size_and_ids_inside_it(tmp_path):
    train_ids, _, _ = _prepare_like_nanogpt(tmp_path / "gpt2", PROSE, meta=False)
    root = str(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="data.vocab_size: .* has no meta.pkl .* 50304"):
        data.load(DataConfig(name="text", root=root, block_size=8))
    dataset = data.load(DataConfig(name="text", root=root, block_size=8, vocab_size=50304))
    assert (dataset.num_outputs, dataset.bytes_per_token, dataset.token_bytes) == (50304, None, None)
    top = int(train_ids.max())
    with pytest.raises(ConfigError, match=rf"train.bin: token {int(np.argmax(train_ids == top))} is id {top}, outside "
                                          rf"the vocabulary of {top}"):
        data.load(DataConfig(name="text", root=root, block_size=8, vocab_size=top))


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from a pickle ran"))


def test_a_meta_pkl_that_names_any_function_is_refused_before_it_runs(tmp_path):
    _prepare_like_nanogpt(tmp_path / "evil", PROSE)
    marker = tmp_path / "ran"
    meta = tmp_path / "evil/meta.pkl"
    meta.write_bytes(pickle.dumps({"vocab_size": 40, "itos": Payload(marker)}))
    with pytest.raises(ConfigError) as failure:
        data.load(DataConfig(name="text", root=str(tmp_path / "evil"), block_size=8))
    assert str(failure.value) == (f"data.root: {meta} holds objects other than plain values (pathlib.Path.write_text); "
                                  "refusing to unpickle it")
    assert not marker.exists()
    pickle.loads(meta.read_bytes())  # what nanoGPT's train.py would have done
    assert marker.exists()


@pytest.mark.parametrize("make,overrides,message", [
    (None, {}, "data.path: no such file or folder: {p}"),
    (lambda p: p.write_bytes(b""), {}, "data.path: {p} is empty"),
    (lambda p: p.write_bytes(PROSE.encode() + b"\xff\xfe" + PROSE.encode()), {},
     f"data.path: {{p}} is not UTF-8 text (byte {len(PROSE.encode())}: invalid start byte)"),
    (lambda p: p.write_bytes("é".encode()[:1]), {}, "data.path: {p} is not UTF-8 text (it ends inside a character)"),
    (lambda p: p.write_text("short text"), {},
     "data.path={p}: its training part (data.val_fraction=0.1): 9 tokens, fewer than one window of data.block_size + 1 = 17"),
    (lambda p: p.write_text("x" * 100), {"val_fraction": 0.1},
     "data.path={p}: its validation part (data.val_fraction=0.1): 10 tokens, fewer than one window"),
    (lambda p: p.mkdir(), {}, "data.path: the folder {p} holds no files"),
    (lambda p: (p.mkdir(), (p / "a").write_bytes(b""), (p / "b").write_bytes(b"")), {}, "data.path: the files of {p} are empty"),
    (lambda p: p.write_text("x" * 2000), {"in_memory": True, "max": 1000},
     "data.in_memory=true would copy 2,000 bytes of tokens to the device (at most 1,000): set data.in_memory=false"),
])
def test_bad_text_is_one_error_naming_the_file(tmp_path, make, overrides, message, monkeypatch):
    path = tmp_path / "bad"
    if make:
        make(path)
    overrides = dict(overrides)
    if "max" in overrides:
        monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", overrides.pop("max"))
    with pytest.raises(ConfigError) as failure:
        data.load(DataConfig(name="text", path=str(path), block_size=16, val_fraction=overrides.pop("val_fraction", 0.1),
                             **overrides))
    assert message.format(p=path) in str(failure.value) and "\n" not in str(failure.value)


@pytest.mark.parametrize("make,message", [
    (lambda r: r.mkdir(), "data.root: {r}/train.bin: no such file (nanoGPT's data/*/prepare.py writes"),
    (lambda r: (r.mkdir(), (r / "train.bin").write_bytes(b"\0" * 99)), "data.root: {r}/train.bin: 99 bytes, not a"),
    (lambda r: (r.mkdir(), (r / "train.bin").write_bytes(b"\0" * 100)), "data.root: {r}/val.bin: no such file"),
    (lambda r: (r.mkdir(), (r / "train.bin").write_bytes(b"\0" * 100), (r / "val.bin").write_bytes(b"")),
     "data.root: {r}/val.bin: 0 bytes, not a positive number of uint16 token ids"),
    (lambda r: (r.mkdir(), (r / "train.bin").write_bytes(b"\0" * 100), (r / "val.bin").write_bytes(b"\0" * 8)),
     "data.root: {r}/val.bin: 4 tokens, fewer than one window of data.block_size + 1 = 17"),
    (lambda r: (r.mkdir(), (r / "train.bin").write_bytes(b"\0" * 100), (r / "val.bin").write_bytes(b"\0" * 100),
                (r / "meta.pkl").write_bytes(b"\x80\x04truncated")), "data.root: {r}/meta.pkl is not a readable pickle"),
    (lambda r: (r.mkdir(), (r / "train.bin").write_bytes(b"\0" * 100), (r / "val.bin").write_bytes(b"\0" * 100),
                (r / "meta.pkl").write_bytes(pickle.dumps({"itos": {}}))), "data.root: {r}/meta.pkl is not nanoGPT's meta"),
])
def test_bad_nanogpt_files_are_one_error_naming_the_file(tmp_path, make, message):
    root = tmp_path / "bins"
    make(root)
    with pytest.raises(ConfigError) as failure:
        data.load(DataConfig(name="text", root=str(root), block_size=16, vocab_size=None if "meta" in message else 300))
    assert message.format(r=root) in str(failure.value)


def test_text_keys_that_conflict_or_go_unread_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path=a.txt and data.root=bins: data=text reads .* set one of them"):
        data.load(DataConfig(name="text", path="a.txt", root="bins"))
    with pytest.raises(ConfigError, match="data.vocab_size=300: byte-level text has 256 tokens"):
        data.load(DataConfig(name="text", vocab_size=300))
    # train_size reads sizes only, and fails alike.
    with pytest.raises(ConfigError, match=f"data.path: no such file or folder: {tmp_path / 'none'}"):
        data.train_size(DataConfig(name="text", path=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="set one of them"):
        data.train_size(DataConfig(name="text", path="a.txt", root="bins"))
    with pytest.raises(ConfigError, match="data.block_size must be left at 64 with data=synthetic, which ignores it"):
        DataConfig(block_size=128)
    with pytest.raises(ConfigError, match=r"data.order must be left at 2 with data=text, .*data=markov\), got 3"):
        DataConfig(name="text", order=3)
