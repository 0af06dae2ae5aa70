"""data=text: token sequences read from files, never loaded whole.

- Byte-level text (256 tokens, no tokenizer): ``data.path`` is a UTF-8 file, memory-mapped as it
  is, or a folder of them (every file under it, hidden ones aside, in the order of their relative
  paths), whose concatenation is written once into a cache folder of distsgd's own and mapped
  from there. With neither ``data.path`` nor ``data.root``: the default corpus, a fixed list of
  the Python standard library's modules (DEFAULT_CORPUS), small enough to be held in memory.
- nanoGPT's prepared format: ``train.bin`` and ``val.bin`` in ``data.root``, the token ids as
  uint16 one after the other (what its data/*/prepare.py write with ndarray.tofile), and, where
  prepare.py wrote one, ``meta.pkl``: a dict with ``vocab_size`` (and, character-level,
  ``itos``/``stoi``), read as plain values only.

Text is read once at start, to check that it is UTF-8 and to hash it: the hash names the cache
file and, printed at start, what a run read.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import platform
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distsgd.config import ConfigError
from distsgd.tokens import Tokens

BYTE_VOCAB = 256
CHUNK = 1 << 24  # bytes (or token ids) read at a time when checking, copying or counting
# The default corpus: modules of the standard library that every CPython distsgd supports has
# had under these names, pure Python, not generated (as _sysconfigdata is, per platform) and not
# split off by distributions; found by name as NAME.py or NAME/__init__.py (string became a
# package in 3.14). About 1.5 MB, tiny Shakespeare's size. Their contents differ from one Python
# version to the next: the start line prints the version and the hash of what was read.
DEFAULT_CORPUS = ("argparse", "ast", "bisect", "calendar", "configparser", "contextlib", "copy", "csv",
                  "dataclasses", "difflib", "enum", "fractions", "functools", "heapq", "inspect", "ipaddress",
                  "locale", "pickle", "pprint", "queue", "random", "shlex", "shutil", "statistics", "string",
                  "tarfile", "textwrap", "threading", "tokenize", "typing", "weakref")


@dataclass(frozen=True)
class Corpus:
    """Where data=text's tokens come from. Byte-level text has its tokens in ``train``; nanoGPT's
    files have theirs in ``train`` and ``val``."""

    train: Tokens
    val: Tokens | None
    vocab_size: int
    source: str  # what was read, for the start line
    token_bytes: tuple[bytes, ...] | None = None  # what each id stands for, where known


def read(path: str | None, root: str | None, vocab_size: int | None) -> Corpus:
    """data=text's tokens: nanoGPT's files in ``root``, else byte-level text from ``path``, else
    the default corpus."""
    check_keys(path, root, vocab_size)
    if root:
        return read_nanogpt(Path(root), vocab_size)
    files = text_files(path)
    if path is None:
        what = (f"the default corpus: {len(files)} modules of Python {platform.python_version()}'s standard library "
                f"({files[0].name}, ..., {files[-1].name}: distsgd.text.DEFAULT_CORPUS) in {files[0].parent}")
        return _byte_corpus(files, what, "the default corpus", whole=True)
    if Path(path).is_file():
        return _byte_corpus(files, f"text file {path}", path)
    names = [str(f.relative_to(path)) for f in files]
    shown = ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"
    return _byte_corpus(files, f"text folder {path}: {len(files)} files ({shown})", f"the files of {path}")


def check_keys(path: str | None, root: str | None, vocab_size: int | None) -> None:
    if path and root:
        raise ConfigError(f"data.path={path} and data.root={root}: data=text reads text from data.path or nanoGPT's "
                          "train.bin and val.bin from data.root; set one of them")
    if not root and vocab_size is not None:
        raise ConfigError(f"data.vocab_size={vocab_size}: byte-level text has 256 tokens, its bytes (data.vocab_size "
                          "is for nanoGPT's token files in data.root)")


def text_files(path: str | None) -> list[Path]:
    """What byte-level text is read from, in order: data.path's file, the files of its folder,
    or the default corpus."""
    if path is None:
        return default_corpus_files()
    if Path(path).is_file():
        return [Path(path)]
    if not Path(path).is_dir():
        raise ConfigError(f"data.path: no such file or folder: {path}")
    return folder_files(Path(path))


def folder_files(folder: Path) -> list[Path]:
    """The files a folder contributes: every file under it whose path below it has no hidden
    (dot) part, in the order of those relative paths."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ConfigError(f"data.path: the folder {folder} holds no files")
    return files


def default_corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in DEFAULT_CORPUS:
        found = [p for p in (stdlib / f"{name}.py", stdlib / name / "__init__.py") if p.is_file()]
        if not found:
            raise ConfigError(f"data=text without data.path reads the default corpus, Python's own {name}.py, "
                              f"which is not in {stdlib} (a Python without its sources?): set data.path")
        files.append(found[0])
    return files


def token_count(path: str | None, root: str | None, vocab_size: int | None) -> int:
    """The tokens of data=text's training sequence, from the files' sizes alone: nothing is read."""
    check_keys(path, root, vocab_size)
    if root:
        return _token_file(Path(root) / "train.bin").stat().st_size // 2
    return sum(f.stat().st_size for f in text_files(path))


def _byte_corpus(files: list[Path], what: str, label: str, whole: bool = False) -> Corpus:
    """One file is mapped as it is; several are concatenated into the cache, or, ``whole``,
    in memory (the default corpus: 1.5 MB, and no folder need be writable). ``label`` names
    the files in an error."""
    digest, size = checked_text(files)
    if size == 0:
        raise ConfigError(f"data.path: {label} {'is' if len(files) == 1 else 'are'} empty")
    where = ""
    if whole:
        tokens = Tokens(tensor=torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8))
    elif len(files) == 1:
        tokens = Tokens(files[0], np.dtype(np.uint8))
    else:
        cached = cache_concatenation(files, digest, size, what)
        tokens, where = Tokens(cached, np.dtype(np.uint8)), f"; concatenated in {cached}"
    source = f"{what}; {size:,} bytes, sha256 {digest[:16]}{where}"
    return Corpus(tokens, None, BYTE_VOCAB, source, tuple(bytes([b]) for b in range(BYTE_VOCAB)))


def checked_text(files: list[Path]) -> tuple[str, int]:
    """The sha256 of the files' concatenation and its size; each file must be UTF-8 text."""
    digest, size = hashlib.sha256(), 0
    for path in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    pending = len(decoder.getstate()[0])
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as err:
                        raise ConfigError(f"data.path: {path} is not UTF-8 text (byte {offset - pending + err.start}: "
                                          f"{err.reason})") from None
                    digest.update(chunk)
                    offset += len(chunk)
        except OSError as err:
            raise ConfigError(f"data.path: cannot read {path} ({err.strerror or err})") from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ConfigError(f"data.path: {path} is not UTF-8 text (it ends inside a character)") from None
        size += offset
    return digest.hexdigest(), size


def cache_folder() -> Path:
    """distsgd's own folder for concatenated text: $XDG_CACHE_HOME/distsgd/text, or ~/.cache/..."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distsgd" / "text"


def cache_concatenation(files: list[Path], digest: str, size: int, what: str) -> Path:
    """The files' concatenation as one file, named by its hash, written unless there already;
    beside it, NAME.txt lists the files. Written under a temporary name and renamed, so ranks
    that write it at once never see a part; a file changed since it was hashed is refused."""
    folder = cache_folder()
    target = folder / f"{digest}.bytes"
    if target.is_file() and target.stat().st_size == size:
        return target
    partial = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{digest}.", delete=False) as out:
            partial, copied = Path(out.name), hashlib.sha256()
            for path in files:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        copied.update(chunk)
        if copied.hexdigest() != digest:
            raise ConfigError(f"data.path: {what}: the files changed while they were read; start again")
        os.replace(partial, target)
        listing = "".join(f"{p.stat().st_size}\t{p}\n" for p in files)
        (folder / f"{digest}.txt").write_text(f"# {what}\n# sha256 {digest}, {size} bytes\n{listing}")
    except OSError as err:
        raise ConfigError(f"data.path: cannot write the concatenated text into {folder} ({err.strerror or err}); "
                          "set XDG_CACHE_HOME to a writable folder") from None
    finally:
        if partial is not None and partial.exists():
            partial.unlink()
    return target


def read_nanogpt(root: Path, vocab_size: int | None) -> Corpus:
    """nanoGPT's train.bin and val.bin in ``root``; the vocabulary is ``vocab_size`` or else
    meta.pkl's, and every id must lie in it (the files are scanned once)."""
    if not root.is_dir():
        raise ConfigError(f"data.root: no such folder: {root} (data=text reads nanoGPT's train.bin and val.bin there)")
    files = [root / "train.bin", root / "val.bin"]
    train, val = (Tokens(_token_file(path), np.dtype(np.uint16)) for path in files)
    meta_path = root / "meta.pkl"
    meta = read_meta(meta_path) if meta_path.is_file() else {}
    vocab = vocab_size or meta.get("vocab_size")
    if vocab is None:
        raise ConfigError(f"data.vocab_size: {root} has no meta.pkl to say the vocabulary of its token ids: set "
                          "data.vocab_size (nanoGPT's default for GPT-2 tokens is 50304, 50257 padded to a multiple "
                          "of 64)")
    if vocab_size and vocab_size < meta.get("vocab_size", 0):
        raise ConfigError(f"data.vocab_size={vocab_size} is smaller than the vocabulary {meta['vocab_size']} that "
                          f"{meta_path} gives")
    for path, tokens in zip(files, (train, val)):
        check_ids(tokens, vocab, path)
    said = "data.vocab_size" if vocab_size else str(meta_path)
    source = (f"nanoGPT's token files in {root}: train.bin {len(train):,} tokens, val.bin {len(val):,} tokens, "
              f"vocabulary {vocab} (from {said})")
    return Corpus(train, val, vocab, source, character_bytes(meta.get("itos"), vocab))


def _token_file(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"data.root: {path}: no such file (nanoGPT's data/*/prepare.py writes train.bin and val.bin)")
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ConfigError(f"data.root: {path}: {size} bytes, not a positive number of uint16 token ids")
    return path


def check_ids(tokens: Tokens, vocab_size: int, path: Path) -> None:
    """Every id below vocab_size: a larger one would fail in the model's embedding, mid-run."""
    for start in range(0, len(tokens), CHUNK):
        chunk = tokens.array[start:start + CHUNK]
        if chunk.max() >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise ConfigError(f"data.root: {path}: token {at} is id {tokens.array[at]}, outside the vocabulary "
                              f"of {vocab_size} (data.vocab_size, or meta.pkl's vocab_size)")


def character_bytes(itos, vocab_size: int) -> tuple[bytes, ...] | None:
    """The UTF-8 bytes of each id of a character-level vocabulary (meta.pkl's itos: id -> str)."""
    if not isinstance(itos, dict) or not all(isinstance(itos.get(i), str) for i in range(len(itos))):
        return None
    return tuple(itos[i].encode("utf-8") if i in itos else b"" for i in range(vocab_size))


def mean_token_bytes(tokens: Tokens, first: int, end: int, token_bytes: tuple[bytes, ...]) -> float:
    """The mean UTF-8 length of tokens[first:end]: bytes per token of that text."""
    lengths = np.array([len(b) for b in token_bytes], dtype=np.int64)
    total = 0
    for start in range(first, end, CHUNK):
        total += int(lengths[np.asarray(tokens.array[start:min(start + CHUNK, end)], dtype=np.int64)].sum())
    return total / (end - first)


class Refused(pickle.UnpicklingError):
    """A pickle names a class or function."""


class PlainValues(pickle.Unpickler):
    """Unpickles containers and scalars only (what opcodes build by themselves: dict, list, tuple,
    set, str, bytes, numbers, bools, None); a pickle naming any class or function is refused
    before anything of it runs."""

    def find_class(self, module: str, name: str):
        raise Refused(f"{module}.{name}")


def read_meta(path: Path) -> dict:
    """nanoGPT's meta.pkl as plain values: a dict with an integer vocab_size."""
    try:
        with open(path, "rb") as f:
            meta = PlainValues(f).load()
    except Refused as err:
        raise ConfigError(f"data.root: {path} holds objects other than plain values ({err}); "
                          "refusing to unpickle it") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways; no code of it ran
        raise ConfigError(f"data.root: {path} is not a readable pickle ({type(err).__name__}: {err})") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 2:
        raise ConfigError(f"data.root: {path} is not nanoGPT's meta.pkl: no dict with an integer vocab_size >= 2")
    return meta
