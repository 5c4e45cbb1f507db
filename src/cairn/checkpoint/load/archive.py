"""What is in a checkpoint file, checked before ``torch.load`` reads any of it.

A torch archive is a zip of uncompressed records under one folder: the pickle ``data.pkl``, one ``data/<key>`` per
storage the pickle names, and a few fixed records. The content hash covers what is unpickled, not the archive, so
the archive itself is held to exactly that: no record the checkpoint does not reference (a planted script or a
spare tensor would otherwise ride along in a file that verifies), no storage record missing or of another size
than the pickle declares (torch maps ``offset .. offset + declared`` of the file, whatever the record holds), and
a pickle that asks for nothing cairn never writes (see :mod:`cairn.checkpoint.load.pickle_scan`).

The records are read through torch's own zip reader as well as Python's: a file the two see differently is
refused, so what is checked here is what torch will read.
"""

from __future__ import annotations

import io
import os
import re
import stat
import zipfile

import torch

from cairn.checkpoint.load.pickle_scan import StorageRef, scan_pickle
from cairn.errors import CheckpointCorruptError

__all__ = ["check_archive", "check_old_style_file", "check_regular_file"]

# The fixed records torch (1.6 to 2.x) writes beside data.pkl and data/<key>.
TORCH_RECORDS = frozenset(
    {"data.pkl", "byteorder", "version", ".data/version", ".data/serialization_id", ".format_version",
     ".storage_alignment"}
)  # fmt: skip
# An old-style file is five pickles in a row (magic number, protocol, system info, the object, storage keys).
_OLD_STYLE_PICKLES = 5


def check_archive(path: str) -> bool:
    """Whether ``path`` is a zip archive (torch's format, read memory-mapped), refusing a damaged, padded or
    hostile one with :class:`CheckpointCorruptError` (or :class:`UnsafeCheckpointError` for a pickle that would
    run code) before torch inflates, allocates or unpickles anything."""
    check_regular_file(path)
    try:
        if not zipfile.is_zipfile(path):
            return False  # an old-style pickle, or not a checkpoint at all: see check_old_style_file
        size = os.path.getsize(path)
    except Exception as err:  # noqa: BLE001 - a damaged directory fails in many ways (versions, sizes, names)
        raise _damaged(path, f"a damaged archive ({err})") from None
    _check_zip(path, path, size)
    return True


def check_regular_file(path: str) -> None:
    """Refuse, without reading it, anything but a readable regular file (or a link to one): opening a FIFO blocks
    until some writer comes, a device such as ``/dev/zero`` never ends, and a socket fails with a raw ``OSError``.

    A file this process cannot open (permissions, a link loop, an I/O error) is a :class:`CheckpointCorruptError`
    too: autoresume then skips it with a warning (keeping it) instead of stopping on a raw ``OSError``.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):  # opened once, without waiting (a FIFO swapped in meanwhile must not block)
            os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CheckpointCorruptError(
            f"{path!r} cannot be opened ({err.strerror or err}); fix its permissions or load another checkpoint"
        ) from None
    if not stat.S_ISREG(mode):
        raise _damaged(path, f"a {_file_kind(mode)}, not a checkpoint file")


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO (named pipe)", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISSOCK: "socket", stat.S_ISDIR: "folder"}  # fmt: skip
    return next((kind for test, kind in kinds.items() if test(mode)), "special file")


def check_archive_bytes(data: io.BytesIO, label: str) -> None:
    """:func:`check_archive` for an archive held in memory (a shard's entry, which DCP wrote with ``torch.save``);
    ``label`` names it in errors. The buffer is left at its start, ready for ``torch.load``."""
    try:
        _check_zip(data, label, len(data.getbuffer()))
    finally:
        data.seek(0)


def _check_zip(source: str | io.BytesIO, label: str, size: int) -> None:
    try:
        with zipfile.ZipFile(source) as archive:
            records = archive.infolist()
    except Exception as err:  # noqa: BLE001 - a damaged directory fails in many ways (versions, sizes, names)
        raise _damaged(label, f"a damaged archive ({err})") from None
    _refuse_inflation(label, records, size)
    names = _record_names(label, records)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    reader = _torch_reader(source, label, names)
    storages = scan_pickle(
        io.BytesIO(_read_record(label, reader, "data.pkl", size)), source=label, archive=True, file_size=size
    )
    _check_storage_records(label, reader, names, storages, size)


def check_old_style_file(path: str) -> None:
    """Scan an old-style (pre-zip) torch file's pickles: its storages are allocated at their declared size the
    moment the pickle names them, so a size larger than the file is refused here, before torch allocates it."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        for _ in range(_OLD_STYLE_PICKLES):
            if file.tell() >= size:
                return
            scan_pickle(file, source=path, archive=False, legacy=True, file_size=size)


def _damaged(path: str, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{path!r} is {why}; refused before reading it: load an earlier checkpoint")


def _refuse_inflation(path: str, records: list[zipfile.ZipInfo], size: int) -> None:
    """torch stores every record uncompressed: a compressed one, or one larger than the file, is a bomb or damage."""
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
            raise CheckpointCorruptError(
                f"{path!r} has a record {record.filename!r} that would inflate to {record.file_size} bytes (the "
                f"file is {size}): a zip bomb or damage, which torch never writes; refused before reading it"
            )


def _record_names(path: str, records: list[zipfile.ZipInfo]) -> set[str]:
    """Each record's name inside the archive's one top folder; two folders, or one name twice, are refused."""
    folders = {record.filename.partition("/")[0] for record in records}
    names = [record.filename.partition("/")[2] for record in records]
    if len(folders) != 1 or "" in names or "" in folders:
        raise _damaged(path, f"an archive with records outside one top folder ({sorted(folders)[:3]})")
    if len(set(names)) != len(names):
        raise _damaged(path, "an archive that holds one record name twice")
    return set(names)


def _torch_reader(source: str | io.BytesIO, path: str, names: set[str]) -> torch._C.PyTorchFileReader:
    """torch's own view of the archive, which must list the same records as Python's."""
    try:
        reader = torch._C.PyTorchFileReader(source)
        seen = set(reader.get_all_records())
    except Exception as err:  # noqa: BLE001 - torch's reader reports damage as RuntimeError with a long text
        raise _damaged(path, f"an archive torch cannot read ({str(err).splitlines()[0][:120]})") from None
    if seen != names:
        raise _damaged(path, "an archive whose directory torch and Python read differently")
    return reader


def _read_record(path: str, reader: torch._C.PyTorchFileReader, name: str, size: int) -> bytes:
    if name not in set(reader.get_all_records()) or reader.get_record_size(name) > size:
        raise _damaged(path, f"an archive without a readable {name!r} record")
    try:
        return reader.get_record(name)
    except Exception as err:  # noqa: BLE001 - see _torch_reader
        raise _damaged(path, f"an archive whose {name!r} cannot be read ({str(err).splitlines()[0][:120]})") from None


def _check_storage_records(
    path: str, reader: torch._C.PyTorchFileReader, names: set[str], storages: dict[str, StorageRef], size: int
) -> None:
    """Every record is one torch writes or one the pickle names; every storage it names is there, whole."""
    wanted = {f"data/{key}": ref for key, ref in storages.items()}
    extra = sorted(names - TORCH_RECORDS - wanted.keys())
    if extra:
        raise _damaged(path, f"an archive with records the checkpoint does not use ({', '.join(extra[:3])[:120]})")
    for name, ref in wanted.items():
        if name not in names:
            raise _damaged(path, f"an archive missing the record {name!r} its data refers to")
        held = reader.get_record_size(name)
        if held != ref.nbytes or reader.get_record_offset(name) + held > size:
            raise _damaged(path, f"an archive whose record {name!r} holds {held} bytes where {ref.nbytes} are declared")


# Pickle opcodes that import or call something: GLOBAL, STACK_GLOBAL, INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, REDUCE.
_CODE_OPCODES = {ord(c) for c in "c\x93io\x81\x92\x82\x83\x84R"}


def needs_code(message: str, *, is_archive: bool) -> bool:
    """A named global, or (inside a well-formed torch archive) an opcode that imports or calls something.

    Outside an archive an odd opcode is far more likely noise than a payload, so it counts as damage.
    """
    if "GLOBAL" in message:
        return True
    operand = re.search(r"Unsupported operand (\d+)", message)
    return is_archive and operand is not None and int(operand.group(1)) in _CODE_OPCODES


def error_reason(err: BaseException) -> str:
    """The line of torch's (long) message that says what was wrong; the offending global when there is one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch's message carries terminal bold codes
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for keyword in ("GLOBAL", "Unsupported", "failed finding", "error"):
        for line in lines:
            if keyword in line and not line.startswith("Weights only load failed"):
                return line[:200]
    return (lines[-1] if lines else type(err).__name__)[:200]
