"""CIFAR-10 on disk and in memory: a safe batch reader, a Dataset, loaders, an offline stand-in."""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from transforms import seed_transform

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
IMAGE_BYTES = 32 * 32 * 3
BATCH_IMAGES = 10_000  # every official batch holds this many; none may hold more

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

# numpy 2 renamed numpy.core to numpy._core; batches pickled under either name are read. The
# names are only matched, never imported, so numpy 1.x and 2.x both read both.
_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
# The dtypes a batch's arrays and numpy-scalar labels may have (numpy's pickled spelling).
_NUMBER_TYPES = frozenset(("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"))
_BYTE_ORDERS = ("<", ">", "|", "=")
# How a pickle holds raw bytes: Python 2's text, bytes, protocol 5's in-band bytearray.
_RAW_TYPES = (str, bytes, bytearray)
# Pickle protocol 5 stores an array as numpy's _frombuffer(buffer, dtype, shape, order).
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")

# What a batch file may cost, checked before it is unpickled: an official batch is ~31 MB (up
# to 62 MB pickled by Python 3 with protocol 2, which stores bytes as UTF-8 text) and ~40,000
# opcodes (10,000 labels, 10,000 filenames; numpy scalars as labels take ~8 opcodes each).
MAX_BATCH_BYTES = 64 * 2**20
_MAX_OPCODES = 200_000
_MAX_STACK = 2 * BATCH_IMAGES  # all of a batch's labels or filenames may be on it at once
_MAX_MARKS = 16  # a batch nests: dict > array state > dtype state
# How deep objects may nest, each container or call result one deeper than what it holds. A
# batch nests 6 deep at most (dict > list of numpy-int labels > a label > its arguments > their
# dtype > its state). Far deeper tuples crash CPython: hashing one as a dict key recurses in C.
_MAX_DEPTH = 8
_MAX_DICT_ENTRIES = 64  # a batch is one dict of 4 entries
_MAX_INT_BITS = 64
_MAX_DIMS = 64  # numpy's own limit on an array's dimensions

# The opcodes that pickle protocols 2 to 5 use for a batch (Python 2's, as in the official
# files, and Python 3's with numpy 1.x or 2.x), by what they do to the unpickler's stack. Sets,
# frozensets, floats, text-protocol opcodes, NEWOBJ and out-of-band buffers are not among them.
_LEAF_OPCODES = frozenset((  # push a string, number, None, bool or global: a leaf
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "SHORT_BINSTRING",
    "BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES",
    "BINBYTES8", "BYTEARRAY8", "GLOBAL", "STACK_GLOBAL",
))
_CONTAINER_OPCODES = frozenset((  # push a new tuple, list or dict
    "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
))
_CALL_OPCODES = frozenset(("REDUCE",))  # push a call's result, which holds its arguments
# Change the object below their arguments (a list, a dict, a call's result) and leave it there.
_UPDATE_OPCODES = frozenset(("APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD"))
_DICT_OPCODES = frozenset(("SETITEM", "SETITEMS"))  # their arguments are key, value pairs
_MARK_OPCODES = frozenset(("TUPLE", "APPENDS", "SETITEMS"))  # take everything above the mark
_MEMO_WRITE_OPCODES = frozenset(("BINPUT", "LONG_BINPUT", "MEMOIZE"))  # store the top object
_MEMO_READ_OPCODES = frozenset(("BINGET", "LONG_BINGET"))  # push a stored object
_BATCH_OPCODES = (
    _LEAF_OPCODES | _CONTAINER_OPCODES | _CALL_OPCODES | _UPDATE_OPCODES | _MEMO_WRITE_OPCODES
    | _MEMO_READ_OPCODES | {"PROTO", "FRAME", "MARK", "STOP"}
)
# How many objects each opcode pops besides a mark and what is above it: pickletools' list of
# what it takes, less those two. (Memo writes pop nothing; they store the top object.)
_POPPED = {
    op.name: sum(x not in (pickletools.markobject, pickletools.stackslice) for x in op.stack_before)
    for op in pickletools.opcodes
    if op.name in _BATCH_OPCODES - _MEMO_WRITE_OPCODES
}


class CIFAR10FormatError(ValueError):
    """CIFAR-10 data on disk (a batch, or the downloaded archive) that is unsafe or corrupt."""


class RefusedFileError(ValueError):
    """A file `read_regular_file` will not read: not a regular file, too large, or growing."""


class _NotABatch(pickle.UnpicklingError):
    """The pickle holds something that no CIFAR-10 batch holds."""


@dataclass(slots=True)
class _DtypeStub:
    """A pickled numpy.dtype, kept as inert data until `_plain_dtype` checks it."""

    spec: object
    state: object = None

    def __setstate__(self, state: object) -> None:
        """Keep the state that numpy would apply (its byte order and any fields)."""
        self.state = state


@dataclass(slots=True)
class _ArrayStub:
    """A pickled numpy array, kept as inert data until `_array` checks it against its bytes."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        """Keep the (version, shape, dtype, fortran order, bytes) state numpy would apply."""
        self.state = state


@dataclass(slots=True)
class _ScalarStub:
    """A pickled numpy scalar (a label saved as a numpy int), kept as data until checked."""

    dtype: object
    raw: object


class _BatchUnpickler(pickle.Unpickler):
    """Reads a pickle into plain data in which numpy objects are stubs.

    A file can never run code, and no numpy array exists until `_array` has checked its size
    against the bytes the file holds: numpy itself would build crafted arrays that are huge,
    that stretch a few bytes over gigabytes, or that read raw bytes as object pointers.
    """

    def __init__(self, content: bytes) -> None:
        """Read the pickle `content`, which `_scan_pickle` has checked."""
        super().__init__(io.BytesIO(content), encoding="latin1")
        self._bytes_left = len(content)  # no real batch decodes to more bytes than its file holds

    def find_class(self, module: str, name: str) -> object:
        """Resolve only the globals a CIFAR-10 batch needs; refuse everything else."""
        # Bound methods rather than the stub classes or plain functions: BUILD can set
        # attributes on a class or a function, so one file could change how the next is read.
        allowed = {
            ("_codecs", "encode"): self._encode,
            # protocol 2 pickles b"" (an empty array's bytes) as bytes(); Python 2 names it so
            ("__builtin__", "bytes"): self._empty_bytes,
            ("builtins", "bytes"): self._empty_bytes,
            ("numpy", "dtype"): self._dtype,
            ("numpy", "ndarray"): self._ndarray,
            **{(m, "_reconstruct"): self._reconstruct for m in _MULTIARRAY_MODULES},
            **{(m, "scalar"): self._scalar for m in _MULTIARRAY_MODULES},
            **{(m, "_frombuffer"): self._frombuffer for m in _NUMERIC_MODULES},
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise _NotABatch(
                f"refusing to load {_brief(module)}.{_brief(name)}: a CIFAR-10 batch holds only "
                "numpy arrays, lists, strings and numbers"
            ) from None

    def _encode(self, text: object, encoding: object) -> bytes:
        """_codecs.encode as pickle protocol 2 uses it: latin1 text, up to the file's size."""
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            # other codecs turn a few bytes into many (hex doubles them, and nests)
            raise _NotABatch(
                f"refusing _codecs.encode({type(text).__name__}, {_brief(encoding)}): a CIFAR-10 "
                "batch only uses it to store bytes as latin1 text"
            )
        self._bytes_left -= len(text)
        if self._bytes_left < 0:
            raise _NotABatch("refusing to decode more bytes than the file holds")
        return text.encode("latin1")

    def _empty_bytes(self) -> bytes:
        """bytes() with no arguments, as protocol 2 pickles b"": nothing else is accepted."""
        return b""

    def _dtype(self, spec: object, align: object = False, copy: object = False) -> _DtypeStub:
        """numpy.dtype(spec, align, copy) as a stub."""
        return _DtypeStub(spec)

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> _ArrayStub:
        """numpy's empty start for a pickled array; its real shape and bytes arrive by BUILD."""
        return _ArrayStub()

    def _frombuffer(
        self, buffer: object, dtype: object, shape: object, order: object
    ) -> _ArrayStub:
        """numpy's protocol-5 array, as the stub of the state protocol 2 would have set."""
        return _ArrayStub((1, shape, dtype, order != "C", buffer))

    def _scalar(self, dtype: object, raw: object) -> _ScalarStub:
        """numpy's pickled scalar as a stub."""
        return _ScalarStub(dtype, raw)

    def _ndarray(self, *args: object, **kwargs: object) -> NoReturn:
        """Refuse numpy.ndarray(...): numpy's pickles never call it, crafted ones stretch memory."""
        raise _NotABatch(
            "refusing to call numpy.ndarray directly: numpy pickles arrays from their bytes, and "
            "a direct call can stretch a few bytes into a huge array"
        )


def _brief(value: object) -> str:
    """File data for a message, bounded: a string's first 40 characters, else a type's name."""
    if isinstance(value, str):
        return value if len(value) <= 40 else f"{value[:40]}..."
    return f"a {type(value).__name__}"


def _scan_pickle(content: bytes) -> None:
    """Refuse a pickle that costs more than a batch could, before any of it is unpickled.

    Walks the opcodes as the unpickler would, tracking only the stack's shape (`_PickleShape`),
    so the unpickler then cannot allocate more than a small multiple of the file's size, nor
    spend more than linear time on it, nor nest objects deep enough to crash CPython.
    """
    shape = _PickleShape()
    for count, (opcode, arg, _) in enumerate(pickletools.genops(content), start=1):
        if opcode.name not in _BATCH_OPCODES:
            raise _NotABatch(f"pickle opcode {opcode.name}, which no CIFAR-10 batch uses")
        if count > _MAX_OPCODES:
            raise _NotABatch(f"more than {_MAX_OPCODES:,} pickle opcodes; a batch has ~40,000")
        if opcode.name == "LONG1" and arg.bit_length() > _MAX_INT_BITS:
            raise _NotABatch(f"an integer of {arg.bit_length()} bits; a batch's fit in 64")
        shape.apply(opcode.name, arg)
    if shape.stack or shape.marks:
        raise _NotABatch("objects left on the stack after its end")


@dataclass(slots=True)
class _Built:
    """A tuple, list, dict or call result that the file builds, as `_scan_pickle` tracks it."""

    container: bool  # a tuple, list or dict, which the memo may not share (see _PickleShape)
    depth: int = 1  # how deep objects nest in it, itself included
    inside: bool = False  # held by another object, so it may change no more


# A stack or memo entry: what the file built, or None for a leaf (a string, number, None or
# global), which holds nothing and which no opcode of a batch changes.
_Entry = _Built | None


@dataclass
class _PickleShape:
    """The unpickler's state as `_scan_pickle` tracks it: the stack's shape, marks and memo.

    The memo may share leaves and call results (numpy dtypes), never a tuple, list or dict:
    shared containers nest exponentially, and a batch shares none. An object is complete
    before another holds it, so the depth recorded for everything holding it stays true.
    """

    stack: list[_Entry] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)
    memo: dict[int, _Entry] = field(default_factory=dict)
    memo_writes: int = 0
    dict_entries: int = 0

    def apply(self, name: str, arg: object) -> None:
        """Apply one opcode's effect on the stack, memo and counts; refuse one beyond a batch's."""
        if name == "MARK":
            self.marks.append(len(self.stack))
        elif name in _MEMO_WRITE_OPCODES:
            self._memo_write(name, arg)
        elif name in _MEMO_READ_OPCODES:
            self.stack.append(self._memo_read(name, arg))
        else:
            above_mark = self._pop_to_mark(name) if name in _MARK_OPCODES else []
            popped = self._pop(name, _POPPED[name])
            if name in _UPDATE_OPCODES:
                self._update(name, popped[0], popped[1:] + above_mark)
            elif name in _CONTAINER_OPCODES or name in _CALL_OPCODES:
                built = _Built(container=name in _CONTAINER_OPCODES)
                self._hold(built, popped + above_mark)
                self.stack.append(built)
            elif name in _LEAF_OPCODES:
                self.stack.append(None)
        if (len(self.stack) > _MAX_STACK or len(self.marks) > _MAX_MARKS
                or self.dict_entries > _MAX_DICT_ENTRIES):
            raise _NotABatch(
                f"{len(self.stack):,} objects on the stack, {len(self.marks)} nested marks, "
                f"{self.dict_entries} dict entries: a batch, one flat dict, needs at most "
                f"{_MAX_STACK:,}, {_MAX_MARKS} and {_MAX_DICT_ENTRIES}"
            )

    def _floor(self) -> int:
        """The lowest stack position an opcode may reach: the unpickler fences off a mark's."""
        return self.marks[-1] if self.marks else 0

    def _pop_to_mark(self, name: str) -> list[_Entry]:
        """Pop the innermost mark and every object above it."""
        if not self.marks:
            raise _NotABatch(f"{name} without a MARK before it")
        start = self.marks.pop()
        above = self.stack[start:]
        del self.stack[start:]
        return above

    def _pop(self, name: str, count: int) -> list[_Entry]:
        """Pop `count` objects, the deepest first."""
        start = len(self.stack) - count
        if start < self._floor():
            raise _NotABatch(f"{name} finds too few objects on the stack")
        popped = self.stack[start:]
        del self.stack[start:]
        return popped

    def _update(self, name: str, target: _Entry, parts: list[_Entry]) -> None:
        """Put `parts` into `target` (APPEND, SETITEM, BUILD) and push it back."""
        if target is None or target.inside:
            changed = "a string, number or global" if target is None else "an object another holds"
            raise _NotABatch(
                f"{name} changes {changed}: a batch changes only the lists, dicts and arrays it "
                "is building"
            )
        if name in _DICT_OPCODES:
            self.dict_entries += len(parts) // 2
        self._hold(target, parts)
        self.stack.append(target)

    def _hold(self, holder: _Built, parts: list[_Entry]) -> None:
        """Record that `holder` holds `parts`: they are finished, and it is deeper than each."""
        for part in parts:
            if part is not None:
                part.inside = True
                holder.depth = max(holder.depth, part.depth + 1)
        if holder.depth > _MAX_DEPTH:
            raise _NotABatch(
                f"objects nested {holder.depth} deep, more than the {_MAX_DEPTH} allowed (a batch "
                "nests 6)"
            )

    def _memo_write(self, name: str, index: object) -> None:
        """Store the top object, at an index no later than the memo writes so far allow."""
        if len(self.stack) <= self._floor():
            raise _NotABatch(f"{name} with nothing on the stack to store")
        self.memo_writes += 1
        index = len(self.memo) if name == "MEMOIZE" else index
        # Pickle numbers its memo from 0, Python 2's cPickle (the official batches) from 1. A
        # larger index would make the unpickler size its memo table by it first.
        if index > self.memo_writes:
            raise _NotABatch(
                f"{name} {index} skips memo entries (it is memo write {self.memo_writes})"
            )
        self.memo[index] = self.stack[-1]

    def _memo_read(self, name: str, index: object) -> _Entry:
        """The stored object at `index`, unless missing or a container."""
        entry = self.memo.get(index)
        if index not in self.memo or (entry is not None and entry.container):
            raise _NotABatch(
                f"{name} {index} reads a memo entry that is missing or holds a list, dict or "
                "tuple: a batch shares none, and shared containers nest exponentially"
            )
        return entry


def _as_bytes(raw: str | bytes | bytearray) -> bytes | bytearray:
    """Pickled array bytes: Python 2 batches hold them as text, read as latin1."""
    return raw.encode("latin1") if isinstance(raw, str) else raw


def _plain_dtype(stub: object) -> np.dtype:
    """The plain number type (bool, int, uint or float) that a pickled numpy.dtype names."""
    state = stub.state if isinstance(stub, _DtypeStub) else None
    if not (
        isinstance(stub, _DtypeStub)
        and isinstance(stub.spec, str)
        and stub.spec in _NUMBER_TYPES
        and isinstance(state, tuple)
        and len(state) >= 5
        and state[1] in _BYTE_ORDERS
        and state[2:5] == (None, None, None)  # no subarray, no fields
    ):
        raise _NotABatch("an array or scalar of something other than plain numbers")
    return np.dtype(stub.spec).newbyteorder(state[1])


def _array(stub: object) -> np.ndarray:
    """The array a pickled ndarray describes, built over its bytes once their count matches."""
    if not isinstance(stub, _ArrayStub):
        raise _NotABatch(f"a {type(stub).__name__} where a numpy array belongs")
    state = stub.state
    if not (
        isinstance(state, tuple)
        and len(state) == 5
        and type(state[1]) is tuple
        and all(type(n) is int and n >= 0 for n in state[1])
        and state[3] is False  # C order, as numpy pickles a C-contiguous array
    ):
        raise _NotABatch("an array whose pickled state is not numpy's (shape, dtype, C order)")
    _, shape, dtype_stub, _, raw = state
    dtype = _plain_dtype(dtype_stub)
    size = _byte_count(shape, dtype)
    if not isinstance(raw, _RAW_TYPES) or len(raw) != size:
        held = len(raw) if isinstance(raw, _RAW_TYPES) else 0
        raise _NotABatch(
            f"an array of shape {shape!r:.60} needs {size} bytes but the file holds {held} for it"
        )
    return np.frombuffer(_as_bytes(raw), dtype).reshape(shape)


def _byte_count(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The bytes an array of `shape` holds, refused where no numpy array or batch is so large."""
    if len(shape) > _MAX_DIMS:
        raise _NotABatch(f"an array of {len(shape)} dimensions; numpy allows {_MAX_DIMS}")
    # At most 64 sides of at most 64 bits (`_scan_pickle` refuses any longer integer, and a
    # batch's only others are BININT's 32): a product of at most 4,096 bits, quick however huge
    # (a product of many huge sides grows with each and takes quadratic time).
    size = math.prod(shape) * dtype.itemsize
    if size > BATCH_IMAGES * IMAGE_BYTES:
        raise _NotABatch(
            f"an array of shape {shape!r:.60}: more than a batch of {BATCH_IMAGES} images holds"
        )
    return size


def _label(value: object) -> int | np.generic:
    """One pickled label: a Python int, or a numpy scalar read from exactly its bytes."""
    if type(value) is int:
        return value
    if isinstance(value, _ScalarStub):
        dtype = _plain_dtype(value.dtype)
        if isinstance(value.raw, _RAW_TYPES) and len(value.raw) == dtype.itemsize:
            return np.frombuffer(_as_bytes(value.raw), dtype)[0]
    raise _NotABatch(f"a label of type {type(value).__name__}; CIFAR-10 labels are integers")


def _labels(value: object) -> np.ndarray:
    """The pickled labels: a list of integers (as CIFAR-10 stores them) or an array."""
    if isinstance(value, _ArrayStub):
        return _array(value)
    if not isinstance(value, list):
        raise _NotABatch(f"labels of type {type(value).__name__}; expected a list of integers")
    return np.array([_label(x) for x in value])


def read_regular_file(path: Path, limit: int) -> bytes:
    """All the bytes of `path`, which must be a regular file of at most `limit` bytes.

    A directory, FIFO or device is refused unread (a FIFO would block, /dev/zero never ends).
    Raises OSError when `path` cannot be opened or read, RefusedFileError for any other refusal.
    """
    # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFileError(f"it is {_file_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise RefusedFileError(
                f"it holds {info.st_size:,} bytes, more than the {limit:,} allowed"
            )
        with open(fd, "rb", closefd=False) as file:
            content = file.read(info.st_size + 1)
    finally:
        os.close(fd)
    if len(content) > info.st_size:
        raise RefusedFileError("it grew while it was read (is something still writing it?)")
    return content


def _file_kind(mode: int) -> str:
    """What a stat mode says a file is, in words."""
    kinds = {
        stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python batch file into (uint8 N x 32 x 32 x 3 images, int64 N labels)."""
    fix = f"Delete {path.parent} and download CIFAR-10 again (load_cifar10(root, download=True))."
    try:
        content = read_regular_file(path, MAX_BATCH_BYTES)
    except OSError as err:
        raise CIFAR10FormatError(
            f"{path}: cannot read this batch ({err.strerror or err}). Check that it exists and "
            f"that you may read it; else: {fix}"
        ) from err
    except RefusedFileError as err:
        raise CIFAR10FormatError(f"{path}: not a CIFAR-10 batch file ({err}). {fix}") from err
    try:
        _scan_pickle(content)
        batch = _BatchUnpickler(content).load()
        return _images_and_labels(batch)
    except _NotABatch as err:
        raise CIFAR10FormatError(f"{path}: not a CIFAR-10 batch ({err}). {fix}") from err
    except MemoryError as err:
        raise CIFAR10FormatError(
            f"{path}: ran out of memory reading this batch (a real one needs about 100 MB), so "
            f"the file is corrupt or this machine is out of memory. Free memory and retry; if it "
            f"fails again: {fix}"
        ) from err
    except RecursionError as err:
        raise CIFAR10FormatError(
            f"{path}: nested too deeply to be a CIFAR-10 batch (a flat dict of arrays and "
            f"lists). {fix}"
        ) from err
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError
    ) as err:
        raise CIFAR10FormatError(
            f"{path}: truncated or corrupt batch ({type(err).__name__}: {err}). {fix}"
        ) from err


def _images_and_labels(batch: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate a decoded batch dict and reshape its rows into HWC images."""
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise _NotABatch(
            f"a {type(batch).__name__}, not a dict with 'data' and 'labels' (the CIFAR-10 "
            "python format): is this a cifar-10-batches-py folder?"
        )
    data = _array(batch["data"])
    labels = _labels(batch["labels"])
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or data.dtype != np.uint8:
        raise _NotABatch(
            f"data has shape {data.shape} and dtype {data.dtype}; expected uint8 rows of "
            f"{IMAGE_BYTES} bytes (N x 3072)"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise _NotABatch(f"{labels.shape} labels for {len(data)} images; expected one integer each")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise _NotABatch(
            f"labels span {labels.min()}..{labels.max()}; CIFAR-10 labels are 0..9 "
            "(is this CIFAR-100?)"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_cifar10(
    root: str | os.PathLike, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 from `root/cifar-10-batches-py` as (uint8 N x 32 x 32 x 3, int64 N).

    Args:
        root: the folder that holds (or will hold) `cifar-10-batches-py/`.
        train: the training batches (data_batch_1..5) if True, else test_batch.
        download: fetch the official archive (CIFAR10_URL, checked against CIFAR10_MD5) when
            the batches are missing.

    Any folder in the python-batch format works, including one with fewer batches or fewer
    images per batch. Every present batch of the split is read.
    """
    folder = batch_folder(root)
    names = TRAIN_BATCHES if train else TEST_BATCHES
    # Any entry by a batch's name counts (a directory, a dangling link): read_batch names
    # what is wrong with it, where skipping it would silently train on fewer images.
    if not any(os.path.lexists(folder / name) for name in names):
        if not download:
            raise FileNotFoundError(
                f"No CIFAR-10 {'training' if train else 'test'} batches in {folder}. "
                "Pass download=True to fetch them, or point root at the folder that "
                f"contains {BATCH_FOLDER}/."
            )
        _download(Path(root))
    paths = [folder / name for name in names if os.path.lexists(folder / name)]
    parts = [read_batch(path) for path in paths]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels


def batch_folder(root: str | os.PathLike) -> Path:
    """`root/cifar-10-batches-py`, after refusing a `root` (or batch folder) that is a file."""
    for path in (Path(root), Path(root) / BATCH_FOLDER):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(
                f"{path} is a file, not a folder. Point root (S9_DATA in the notebook) at the "
                f"folder that holds {BATCH_FOLDER}/, or at a new folder to download CIFAR-10 into."
            )
    return Path(root) / BATCH_FOLDER


@dataclass
class Splits:
    """Train, validation and test arrays, and where they came from (for the reader).

    The validation arrays are empty unless `load_splits` was asked to hold images out.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    val_images: np.ndarray = field(default_factory=lambda: np.empty((0, 32, 32, 3), np.uint8))
    val_labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def load_splits(
    root: str | os.PathLike | None,
    download: bool = False,
    limit: tuple[int, int] | None = None,
    synthetic_fallback: bool = False,
    validation: int = 0,
    split_seed: int = 0,
) -> Splits:
    """Both CIFAR-10 splits from `root`, optionally cut to (train, test) sizes.

    Args:
        root: the folder holding `cifar-10-batches-py/` (None: nothing on disk).
        download: fetch CIFAR-10 when the batches are missing.
        limit: keep only the first (train, test) images: a smoke run's slice.
        synthetic_fallback: use `synthetic_cifar10` when no batches are on disk
            (offline smoke runs and benchmarks) instead of raising.
        validation: hold this many training images out as a validation split (stratified by
            class), so recipes are tuned without looking at the test set.
        split_seed: picks which images are held out.
    """
    # Any batch counts: a folder with half the batches is an error to name, not a reason to
    # swap real images for synthetic ones.
    on_disk = root is not None and any(
        os.path.lexists(batch_folder(root) / name) for name in (*TRAIN_BATCHES, *TEST_BATCHES)
    )
    if synthetic_fallback and not on_disk and not download:
        images, labels = synthetic_cifar10(6000, seed=0)
        train, test = (images[:5000], labels[:5000]), (images[5000:], labels[5000:])
        source = "synthetic_cifar10 (no CIFAR-10 batches on disk)"
    elif root is None:
        raise FileNotFoundError("no CIFAR-10 folder given: pass root (the notebook reads S9_DATA)")
    else:
        train, test = load_cifar10(root, True, download), load_cifar10(root, False, download)
        source = f"CIFAR-10 python batches in {Path(root) / BATCH_FOLDER}"
    n_train, n_test = limit if limit is not None else (None, None)
    train = (train[0][:n_train], train[1][:n_train])
    splits = Splits(*train, test[0][:n_test], test[1][:n_test], source)
    if validation:
        held_out = stratified_indices(splits.train_labels, validation, split_seed)
        kept = np.setdiff1d(np.arange(len(splits.train_labels)), held_out)
        splits.val_images, splits.val_labels = train[0][held_out], train[1][held_out]
        splits.train_images, splits.train_labels = train[0][kept], train[1][kept]
    return splits


def stratified_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` random indices into `labels` with each class in its share of the whole, sorted.

    Shares are rounded by largest remainder, so the total is exactly `count`.
    """
    if not 0 < count < len(labels):
        raise ValueError(
            f"cannot hold out {count} of {len(labels)} training images: "
            "choose a validation size between 1 and the training-set size minus 1"
        )
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * count / len(labels)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact)[: count - quota.sum()]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, quota)
    ]
    return np.sort(np.concatenate(picked))


@dataclass
class ClassCount:
    """How many images of one class a split holds."""

    label: int
    name: str
    images: int


def class_counts(labels: np.ndarray) -> list[ClassCount]:
    """Images per class, in label order."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    return [ClassCount(i, name, int(counts[i])) for i, name in enumerate(CLASSES)]


def _download(root: Path) -> None:
    """Fetch the official CIFAR-10 archive into `root` (unless there and intact) and unpack it."""
    from torchvision.datasets.utils import check_integrity

    archive = root / os.path.basename(CIFAR10_URL)
    if not check_integrity(archive, CIFAR10_MD5):
        _fetch(archive)
    _unpack(archive, root / BATCH_FOLDER)


def _fetch(archive: Path) -> None:
    """Download CIFAR10_URL to `archive`; delete and refuse a download whose md5 is wrong."""
    from torchvision.datasets.utils import check_integrity, download_url

    archive.unlink(missing_ok=True)  # a cut-off earlier download, which download_url would keep
    try:
        download_url(CIFAR10_URL, archive.parent, archive.name)
    except (OSError, HTTPException) as err:
        archive.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download CIFAR-10 from {CIFAR10_URL} ({err}). If this machine is offline, "
            f"set S9_DATA to a folder that holds {BATCH_FOLDER}/, or download the archive by hand "
            f"and unpack it into {archive.parent}."
        ) from err
    if not check_integrity(archive, CIFAR10_MD5):
        archive.unlink()
        raise CIFAR10FormatError(
            f"{archive}: the download's md5 is not {CIFAR10_MD5}, so it is corrupt or not the "
            f"official archive, and was deleted. Run again to download it afresh, or fetch "
            f"{CIFAR10_URL} by hand and unpack it into {archive.parent}."
        )


def _unpack(archive: Path, folder: Path) -> None:
    """Unpack the batches in `archive` into `folder`, each file whole or not at all."""
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        with tarfile.open(archive) as tar:
            # "data" refuses paths outside scratch; naming it keeps Python 3.12+ from warning
            tar.extractall(scratch, filter="data")
        folder.mkdir(exist_ok=True)
        for file in (Path(scratch) / BATCH_FOLDER).iterdir():
            # a rename is atomic: an interrupted unpack never leaves a cut-off batch behind
            os.replace(file, folder / file.name)


class CIFAR10Dataset(Dataset):
    """In-memory CIFAR-10 images (HWC uint8) with an albumentations-style transform.

    Args:
        images: uint8 array N x 32 x 32 x 3.
        labels: integer array of N class indices.
        transform: callable taking `image=` (HWC uint8) and returning {"image": CHW tensor}.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[..., dict],
    ) -> None:
        _check_images(images)
        _check_labels(labels, len(images))
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        """The number of images."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One transformed image (a CHW tensor) and its class index."""
        return self.transform(image=self.images[index])["image"], int(self.labels[index])


def _check_images(images: np.ndarray) -> None:
    """Refuse images the transforms would silently mistrain on, or fail on deep in OpenCV."""
    if not isinstance(images, np.ndarray):
        raise ValueError(
            f"images are a {type(images).__name__}; CIFAR10Dataset needs a numpy array: "
            "convert with np.asarray(images)"
        )
    expected = "uint8 N x 32 x 32 x 3 (HWC colour, 0..255)"
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"images have shape {images.shape}; CIFAR10Dataset needs {expected}. "
            f"{_layout_hint(images.shape)}"
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"images are {images.dtype}; CIFAR10Dataset needs {expected}, which the transforms "
            f"assume. {_uint8_hint(images.dtype)}"
        )


def _layout_hint(shape: tuple[int, ...]) -> str:
    """How to turn images of `shape` into N x 32 x 32 x 3."""
    if shape[1:] == (3, 32, 32):
        return "Channels-first images convert with images.transpose(0, 2, 3, 1)."
    if shape[1:] == (32, 32):
        return "Greyscale images convert with np.repeat(images[..., None], 3, axis=-1)."
    if shape[1:] == (32, 32, 1):
        return "Greyscale images convert with np.repeat(images, 3, axis=-1)."
    return "Resize the images to 32 x 32 with 3 colour channels last."


def _uint8_hint(dtype: np.dtype) -> str:
    """How to turn images of `dtype` into uint8 0..255."""
    if dtype.kind == "f":
        return "Floats in 0..1 convert with (images * 255).round().astype(np.uint8)."
    if dtype == np.uint16:
        return "16-bit images convert with (images // 257).astype(np.uint8)."
    return "Integers in 0..255 convert with images.astype(np.uint8)."


def _check_labels(labels: np.ndarray, count: int) -> None:
    """Refuse labels that are not one CIFAR-10 class index (0..9) per image."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"labels have shape {labels.shape}; CIFAR10Dataset needs one class index per image "
            "(one-hot labels convert with labels.argmax(1))"
        )
    if len(labels) != count:
        raise ValueError(f"{count} images but {len(labels)} labels; they must match")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels are {labels.dtype}; CIFAR10Dataset needs integer class indices 0..9 "
            "(whole-number labels convert with labels.astype(np.int64))"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}; CIFAR-10 class indices are 0..9 "
            "(see dataset.CLASSES)"
        )


def synthetic_cifar10(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable offline stand-in for CIFAR-10: per class a fixed colour pattern plus noise.

    Returns (uint8 n x 32 x 32 x 3, int64 n) with classes in turn (balanced).
    """
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(12345).uniform(40, 215, size=(len(CLASSES), 8, 8, 3))
    patterns = patterns.repeat(4, axis=1).repeat(4, axis=2)  # 8x8 blocks -> 32x32
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    noise = rng.normal(0.0, 40.0, size=(n, 32, 32, 3))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def make_loaders(
    train_set: Dataset,
    test_set: Dataset,
    batch_size: int,
    workers: int | None = None,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """A shuffled, seeded train loader and an ordered test loader.

    Args:
        train_set, test_set: the datasets.
        batch_size: images per batch (the test loader uses twice as many: no gradients).
        workers: loader processes; None picks one per CPU core, up to 8.
        seed: seeds the shuffle and the workers' augmentation, for a repeatable order when
            the loader is iterated directly; `fit` reseeds both every epoch from
            `TrainConfig.seed` (so a resumed run repeats), which then decides.
    """
    workers = default_workers(workers)
    # The train loader's workers restart every epoch (not persistent), so each epoch's
    # augmentation streams are seeded from that epoch's seed: a resumed run then repeats an
    # uninterrupted one exactly.
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_set) > batch_size,  # a tiny last batch would upset BatchNorm
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker,
    )
    seed_epoch(train_loader, seed)
    return train_loader, eval_loader(test_set, batch_size, workers)


def eval_loader(dataset: Dataset, batch_size: int, workers: int | None = None) -> DataLoader:
    """An ordered loader for scoring (test or validation), batching twice `batch_size`.

    Its order and transforms are fixed, so its workers persist across epochs: restarting them
    would only cost time (seconds per epoch where workers are spawned, as on macOS).
    """
    workers = default_workers(workers)
    return DataLoader(
        dataset,
        batch_size=2 * batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def default_workers(workers: int | None) -> int:
    """`workers`, or one loader process per CPU core, up to 8, when it is None."""
    # The cap: on a 16-core H200 machine 16 workers made an epoch no faster than 8
    # (benchmarks/README.md, How fast).
    return min(8, os.cpu_count() or 1) if workers is None else workers


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from the loader's seed."""
    info = get_worker_info()
    seed_transform(getattr(info.dataset, "transform", None), info.seed % 2**32)


def seed_epoch(loader: DataLoader, seed: int) -> None:
    """Make the next epoch's shuffle and augmentation a function of `seed` alone.

    Loader workers start afresh each epoch and seed their augmentation from a number the
    loader draws from its generator (see `_seed_worker`); without workers it is seeded here.
    """
    if loader.generator is not None:
        loader.generator.manual_seed(seed)
    if loader.num_workers == 0:
        seed_transform(getattr(loader.dataset, "transform", None), seed)
