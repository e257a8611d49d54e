"""What the bulk CLI scores: the files of a folder, the members of a zip, or one file.

Inputs come from anywhere, so reading them must never crash the run: a zip that cannot be
opened, an encrypted member, a member whose header lies about its size (or whose data is
corrupt), a file that cannot be read, each becomes an item with an error code and the run
goes on. No member is read past `max_bytes + 1` bytes, whatever its header says.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist_api.errors import PayloadTooLarge, ServiceError

# What reading a zip or one of its members can raise for a broken or hostile archive.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,  # a compression method zipfile does not implement
    RuntimeError,  # an encrypted member zipfile was asked to read without a password
    ValueError,
)
_ENCRYPTED = 0x1  # general purpose bit flag 0 of a zip entry


class InvalidArchive(ServiceError):
    status = 400
    code = "invalid_archive"
    message = "The zip file could not be opened; it may be corrupt or truncated."


class EncryptedMember(ServiceError):
    status = 400
    code = "encrypted_member"
    message = "This zip member is encrypted; the bulk CLI takes no passwords."


class UnreadableMember(ServiceError):
    status = 400
    code = "unreadable_member"
    message = "This zip member could not be read: its data is corrupt or its header is wrong."


class UnreadableFile(ServiceError):
    status = 400
    code = "unreadable_file"
    message = "This file could not be read (permissions, or it vanished during the run)."


@dataclass(frozen=True)
class Item:
    """One input file: its name in the folder or zip, and its bytes (None if refused)."""

    name: str
    data: bytes | None
    error: ServiceError | None = None


def read_items(source: Path, max_bytes: int) -> Iterator[Item]:
    """Files of a folder (recursively, sorted), members of a zip, or the one file given.

    Hidden files and macOS resource forks are skipped.
    """
    if source.is_dir():
        yield from _folder_items(source, max_bytes)
    elif source.suffix.lower() == ".zip" or zipfile.is_zipfile(source):
        yield from _zip_items(source, max_bytes)
    else:
        yield _file_item(source.name, source, max_bytes)


def _folder_items(folder: Path, max_bytes: int) -> Iterator[Item]:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if not _hidden(name):
            yield _file_item(name, path, max_bytes)


def _file_item(name: str, path: Path, max_bytes: int) -> Item:
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError:
        return Item(name, None, UnreadableFile())
    if len(data) > max_bytes:
        return Item(name, None, PayloadTooLarge())
    return Item(name, data)


def _zip_items(source: Path, max_bytes: int) -> Iterator[Item]:
    try:
        archive = zipfile.ZipFile(source)
        members = sorted(archive.infolist(), key=lambda info: info.filename)
    except _ARCHIVE_ERRORS:
        yield Item(source.name, None, InvalidArchive())
        return
    with archive:
        for info in members:
            if not info.is_dir() and not _hidden(info.filename):
                yield _member_item(archive, info, max_bytes)


def _member_item(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> Item:
    name = info.filename
    if info.flag_bits & _ENCRYPTED:
        return Item(name, None, EncryptedMember())
    # The header's size is checked first, so an honest zip bomb is refused unread ...
    if info.file_size > max_bytes:
        return Item(name, None, PayloadTooLarge())
    try:
        with archive.open(info) as member:
            # ... and the read is bounded, so a lying header cannot make it read more.
            data = member.read(max_bytes + 1)
    except _ARCHIVE_ERRORS:
        return Item(name, None, UnreadableMember())
    if len(data) > max_bytes:
        return Item(name, None, PayloadTooLarge())
    if len(data) != info.file_size:
        # The header lied (zipfile only notices when the data also fails its CRC check).
        return Item(name, None, UnreadableMember())
    return Item(name, data)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))
