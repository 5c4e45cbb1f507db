"""Reading a checkpoint's pickle *without running it*, to refuse a hostile file before ``torch.load`` allocates.

torch's weights-only unpickler runs no arbitrary code, but what it does allow can still be turned against the
reader: ``bytearray(2**36)`` allocates 64 GiB from a few bytes, ``_codecs.encode`` chained through ``hex`` doubles
a string at each step, a tensor with a zero stride makes 4 bytes of storage a view of gigabytes, and pickle's memo
lets a 38 KB file hold a list of two references to a list of two references ... forty deep, which every tree walk
(the content hash among them) would expand to 2^40 leaves.

So before torch sees the file, :func:`scan_pickle` walks the pickle's opcodes with :mod:`pickletools` and
simulates the stack with placeholders: nothing is imported, called or allocated beyond the opcodes themselves. It
admits only what cairn writes:

* the globals a cairn checkpoint needs (tensor rebuilding, storage types, dtypes, ``OrderedDict``, ``set``,
  ``bytes`` and ``bytearray`` as protocol 2 spells them, ``complex``, ``torch.device``, ``torch.Size``), each
  called only with the arguments torch itself writes for it;
* tensors whose view is a plain, non-overlapping view inside its storage, of a size the storage declares;
* each dict, list and tuple in one place only (cairn never shares one: it copies the state before saving), so
  every walk of what was read is linear in the file's size; strings, sets and tensors may recur, but the bytes a
  walk would see, counted once per place, must stay within a few times the file's own.
"""

from __future__ import annotations

import math
import pickletools
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import torch

from cairn.checkpoint.tree import overlaps
from cairn.errors import CheckpointCorruptError, UnsafeCheckpointError

__all__ = ["StorageRef", "overlaps", "scan_pickle", "view_problem"]

# What a walk of the loaded checkpoint may see, per place, against what the file holds: a tensor shared by two
# names (tied weights) is hashed twice, so a small factor; the floor keeps tiny files with a few repeats legal.
EXPANSION_FACTOR = 4
EXPANSION_FLOOR = 64 << 20

_CALLABLES = {
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_qtensor",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.bytearray",
    "builtins.complex",
    "_codecs.encode",
    "torch.device",
    "torch.Size",
}
# Opcodes that import or call something: in a well-formed archive they mean a payload, elsewhere likely damage.
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "REDUCE"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_LITERALS = {
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE",
    "SHORT_BINSTRING",
}  # fmt: skip
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class StorageRef:
    """A storage the pickle asks for: the record ``data/<key>`` (or, old-style, a blob after the pickles)."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Built:
    """An object the unpickler would build: its kind (``dict``, ``list``, ``tensor``...) and the bytes a walk of
    the loaded checkpoint reads each time it meets it."""

    kind: str
    cost: int = 1
    storage: StorageRef | None = None


_MARK = object()
_SHAREABLE = {"set", "bytes", "bytearray", "tensor", "complex", "device", "storage"}


class _Refused(Exception):
    def __init__(self, why: str, *, unsafe: bool = False) -> None:
        super().__init__(why)
        self.unsafe = unsafe


def scan_pickle(
    stream: IO[bytes], *, source: str, archive: bool, legacy: bool = False, file_size: int
) -> dict[str, StorageRef]:
    """The storages one pickle in ``stream`` refers to, by key; refuses anything cairn never writes.

    ``archive``: the pickle is a torch archive's ``data.pkl`` (an opcode that calls code is then a payload, not
    noise). ``legacy``: an old-style torch file, whose storage ids carry one more field.
    """
    try:
        with warnings.catch_warnings():  # pickletools warns about the odd escapes a damaged STRING opcode holds
            warnings.simplefilter("ignore", DeprecationWarning)
            return _Scan(archive=archive, legacy=legacy, file_size=file_size).run(stream)
    except _Refused as refusal:
        if refusal.unsafe:
            raise UnsafeCheckpointError(
                f"{source!r} holds Python objects that would need code to run to load ({refusal}); nothing was "
                "executed. cairn checkpoints hold only plain data: re-save it with cairn, or load it yourself with "
                "torch.load(weights_only=False) only if you trust its source"
            ) from None
        raise CheckpointCorruptError(
            f"{source!r} is damaged or not a cairn checkpoint ({refusal}); refused before reading it: load an "
            "earlier checkpoint"
        ) from None


def view_problem(offset: int, size: tuple[int, ...], stride: tuple[int, ...], storage_numel: int) -> str | None:
    """Why a tensor view of a storage is not one cairn writes, or ``None``: every element must have its own place
    (no zero or overlapping strides), and the view must end inside the storage."""
    if len(size) != len(stride) or min((offset, *size, *stride)) < 0:
        return f"a tensor view has sizes {size}, strides {stride} and offset {offset}"
    if 0 in size:
        return None
    if overlaps(size, stride):
        return f"a tensor of size {size} has overlapping strides {stride}"
    if offset + sum((count - 1) * step for count, step in zip(size, stride, strict=True)) >= storage_numel:
        return f"a tensor view (offset {offset}, size {size}, strides {stride}) ends past its {storage_numel} elements"
    return None



class _Scan:
    """The stack machine of torch's weights-only unpickler, over placeholders."""

    def __init__(self, *, archive: bool, legacy: bool, file_size: int) -> None:
        self.archive, self.legacy, self.file_size = archive, legacy, file_size
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, StorageRef] = {}
        self.expanded = 0  # bytes a walk of the loaded checkpoint reads, counted once per place they appear

    def run(self, stream: IO[bytes]) -> dict[str, StorageRef]:
        start = stream.tell()
        try:
            for opcode, arg, _ in _opcodes(_Bounded(stream, self.file_size)):
                self.step(opcode.name, arg)
        except (IndexError, KeyError, TypeError) as err:  # a stack or memo that a real pickle never leaves
            raise _Refused(f"malformed pickle ({type(err).__name__})") from None
        own = stream.tell() - start + sum(ref.nbytes for ref in self.storages.values())
        if self.expanded > EXPANSION_FACTOR * own + EXPANSION_FLOOR:
            raise _Refused(f"its {own} bytes repeat into {self.expanded} through references, which cairn never writes")
        return self.storages

    def push(self, value: Any) -> None:
        self.expanded += _cost(value)
        self.stack.append(value)

    def step(self, name: str, arg: Any) -> None:  # noqa: C901, PLR0912 - one branch per opcode, as in pickle itself
        if name in _LITERALS:
            self.push(arg)
        elif name in _CONSTANTS:
            self.push(_CONSTANTS[name])
        elif name in ("PROTO", "STOP"):
            return
        elif name == "MARK":
            self.marks.append(self.stack)
            self.stack = []
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET"):
            self.push(_Built(name[6:].lower()))
        elif name == "EMPTY_TUPLE":
            self.push(())
        elif name == "TUPLE":
            self.push(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(self.stack[-count:]) if len(self.stack) >= count else _malformed("a short stack")
            del self.stack[-count:]
            self.stack.append(items)
        elif name in ("APPEND", "APPENDS"):
            _ = self.stack.pop() if name == "APPEND" else self.pop_mark()
            self.require_top({"list"}, name)
        elif name in ("SETITEM", "SETITEMS"):
            _ = (self.stack.pop(), self.stack.pop()) if name == "SETITEM" else self.pop_mark()
            self.require_top({"dict", "OrderedDict"}, name)
        elif name == "GLOBAL":
            self.stack.append(_Global(_allowed_global(arg)))
        elif name == "REDUCE":
            args = self.stack.pop()
            self.stack[-1] = self.call(self.stack[-1], args)
        elif name == "BINPERSID":
            self.stack.append(self.storage(self.stack.pop()))
        elif name in ("BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            self.push(self.shared(self.memo[arg]))
        elif name in _CODE_OPCODES:
            raise _Refused(f"opcode {name}", unsafe=self.archive)
        else:
            raise _Refused(f"opcode {name}, which torch's safe loader does not read")

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def require_top(self, kinds: set[str], opcode: str) -> None:
        top = self.stack[-1]
        if not (isinstance(top, _Built) and top.kind in kinds):
            raise _Refused(f"{opcode} into something that is not a {' or '.join(sorted(kinds))}")

    def shared(self, value: Any) -> Any:
        """A second reference to ``value``: fine for strings, numbers, sets and tensors; never for a container."""
        if isinstance(value, tuple) and value or isinstance(value, _Built) and value.kind not in _SHAREABLE:
            raise _Refused("one container is referenced from several places, which cairn never writes")
        return value

    def call(self, func: Any, args: Any) -> _Built:
        if not isinstance(func, _Global) or func.name not in _CALLABLES or not isinstance(args, tuple):
            raise _Refused(f"a call of {getattr(func, 'name', type(func).__name__)}, which cairn never writes")
        built = _call(func.name, args, self)
        if built is None:
            raise _Refused(f"{func.name} called with arguments cairn never writes ({_describe(args)})")
        return built

    def storage(self, pid: Any) -> _Built:
        """A storage id: ``('storage', <type>, key, location, numel)``, and old-style one more field (a view)."""
        fields = 6 if self.legacy else 5
        ok = isinstance(pid, tuple) and len(pid) == fields and pid[0] == "storage" and isinstance(pid[1], _Global)
        ok = ok and isinstance(pid[2], str) and isinstance(pid[3], str) and _is_count(pid[4])
        if not ok or (self.legacy and pid[5] is not None):
            raise _Refused(f"a storage id cairn never writes ({_describe(pid)})")
        ref = StorageRef(pid[2], _storage_dtype(pid[1].name), pid[4])
        if self.storages.setdefault(ref.key, ref) != ref:
            raise _Refused(f"storage {ref.key!r} is declared twice with different types or sizes")
        if ref.nbytes > self.file_size:
            raise _Refused(f"storage {ref.key!r} declares {ref.nbytes} bytes, more than the whole file")
        return _Built("storage", 1, ref)


class _Bounded:
    """``stream`` for pickletools, whose reads never ask for more than the file can still hold: an opcode that
    declares 2**62 bytes of operand would otherwise have ``read`` allocate that much before finding the file short."""

    def __init__(self, stream: IO[bytes], file_size: int) -> None:
        self._stream, self._file_size = stream, file_size

    def read(self, size: int = -1) -> bytes:
        room = max(self._file_size - self._stream.tell(), 0)
        return self._stream.read(room if size < 0 else min(size, room))

    def readline(self) -> bytes:
        return self._stream.readline(max(self._file_size - self._stream.tell(), 0))

    def tell(self) -> int:
        return self._stream.tell()


def _opcodes(stream: _Bounded) -> Iterator[tuple[Any, Any, Any]]:
    try:
        yield from pickletools.genops(stream)
    except ValueError as err:  # genops' word for truncation and for bytes that are not opcodes
        raise _Refused(f"not a readable pickle: {str(err)[:120]}") from None


def _malformed(why: str) -> Any:
    raise _Refused(f"malformed pickle ({why})")


def _cost(value: Any) -> int:
    if isinstance(value, str):
        return len(value) + 1
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    return value.cost if isinstance(value, _Built) else 1


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _allowed_global(arg: str) -> str:
    module, _, name = arg.partition(" ")
    module = "builtins" if module == "__builtin__" else module
    full = f"{module}.{name}"
    if full in _CALLABLES or _is_dtype(module, name) or _is_qscheme(full) or _storage_dtype_or_none(full) is not None:
        return full
    if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(name)):
        raise _Refused("a damaged global name")
    raise _Refused(f"GLOBAL {full}", unsafe=True)


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _storage_dtype_or_none(full: str) -> torch.dtype | None:
    module, _, name = full.rpartition(".")
    if module != "torch" or not name.endswith("Storage") or name in ("TypedStorage", "UntypedStorage"):
        return None
    try:
        return torch.storage._get_dtype_from_pickle_storage_type(name)
    except (KeyError, AttributeError):
        return None


def _storage_dtype(full: str) -> torch.dtype:
    dtype = _storage_dtype_or_none(full)
    if dtype is None:
        raise _Refused(f"{full} is not a storage type")
    return dtype


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_count(item) for item in value)


def _call(name: str, args: tuple[Any, ...], scan: _Scan) -> _Built | None:  # noqa: PLR0911 - one case per callable
    """What calling ``name`` builds, when ``args`` are what torch writes for it; ``None`` otherwise."""
    if name == "torch._utils._rebuild_tensor_v2":
        return _tensor(args)
    if name == "torch._utils._rebuild_qtensor":  # a quantized buffer: the view, then (scheme, scale(s), zero(s)...)
        plain = len(args) == 7 and _quantizer_params(args[4])
        return _tensor((*args[:4], *args[5:])) if plain else None
    if name == "collections.OrderedDict":
        return _Built("OrderedDict") if args == () else None
    if name == "builtins.set":
        return _Built("set") if args == () or len(args) == 1 and args[0] == _Built("list") else None
    if name == "_codecs.encode":  # protocol 2's bytes: encode(text, 'latin1')
        ok = len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1"
        return _Built("bytes", len(args[0]) + 1) if ok else None
    if name == "builtins.bytearray":  # never bytearray(n): that allocates n bytes from one number
        ok = args == () or len(args) == 1 and isinstance(args[0], _Built) and args[0].kind == "bytes"
        return _Built("bytearray", args[0].cost if args else 1) if ok else None
    if name == "builtins.complex":
        ok = len(args) == 2 and all(isinstance(x, float | int) and not isinstance(x, bool) for x in args)
        return _Built("complex") if ok else None
    if name == "torch.device":
        ok = len(args) in (1, 2) and isinstance(args[0], str) and len(args[0]) < 64 and _ints(args[1:])
        return _Built("device") if ok else None
    if name == "torch.Size":
        return _Built("tuple") if len(args) == 1 and _ints(args[0]) else None
    return None


def _quantizer_params(params: Any) -> bool:
    """``(scheme, scale, zero_point)`` per tensor, or ``(scheme, scales, zero_points, axis)`` per channel."""
    if not (isinstance(params, tuple) and params and isinstance(params[0], _Global)):
        return False
    numbers = all(isinstance(x, float | int) and not isinstance(x, bool) for x in params[1:])
    per_channel = len(params) == 4 and all(_is_tensor(x) for x in params[1:3]) and _is_count(params[3])
    return _is_qscheme(params[0].name) and (len(params) == 3 and numbers or per_channel)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, _Built) and value.kind == "tensor"


def _is_qscheme(full: str) -> bool:
    module, _, name = full.rpartition(".")
    return module == "torch" and isinstance(getattr(torch, name, None), torch.qscheme)


def _tensor(args: tuple[Any, ...]) -> _Built | None:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``, its view checked against the
    storage before torch makes it: a stride-0 view of 4 bytes would otherwise be hashed as gigabytes."""
    if len(args) != 6 or not (isinstance(args[0], _Built) and args[0].storage is not None):
        return None
    storage, offset, size, stride, requires_grad, hooks = args
    if not (_is_count(offset) and _ints(size) and _ints(stride) and isinstance(requires_grad, bool)):
        return None
    if hooks != _Built("OrderedDict"):
        return None
    problem = view_problem(offset, size, stride, storage.storage.numel)
    if problem:
        raise _Refused(problem)
    return _Built("tensor", math.prod(size) * storage.storage.dtype.itemsize + 1)


def _describe(value: Any) -> str:
    return repr(value)[:120]
