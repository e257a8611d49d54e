"""Read the uploaded image bytes out of a request: multipart `file`/`files` or a raw body."""

from __future__ import annotations

from flask import Request

from mnist_api.errors import MissingFile, TooManyFiles, UnsupportedMediaType
from mnist_api.imaging.preprocessing import ALLOWED_CONTENT_TYPES


def read_single(request: Request) -> bytes:
    """The image of a /predict request: multipart field `file`, or the raw body."""
    if request.mimetype == "multipart/form-data":
        part = request.files.get("file")
        if part is None or not part.filename:
            raise MissingFile("Send the image in a multipart field named 'file'.")
        data: bytes = part.read()
        if not data:
            raise MissingFile("The uploaded file is empty.")
        return data
    if request.mimetype not in ALLOWED_CONTENT_TYPES:
        # A form body is already parsed by now, so look at its length, not at get_data().
        if request.content_length or request.form or request.get_data(cache=False):
            raise UnsupportedMediaType(
                "Send multipart/form-data with a 'file' field, or the raw image with "
                "Content-Type image/png, image/jpeg, image/gif, image/webp or image/bmp."
            )
        raise MissingFile()
    data = request.get_data(cache=False)
    if not data:
        raise MissingFile()
    return data


def read_batch(request: Request, max_files: int) -> list[bytes]:
    """The images of a /predict/batch request: one multipart `files` part each, in order."""
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("Send the images as multipart/form-data parts named 'files'.")
    parts = [part for part in request.files.getlist("files") if part.filename]
    if not parts:
        raise MissingFile("Send one or more images as multipart fields named 'files'.")
    if len(parts) > max_files:
        raise TooManyFiles(f"A batch takes at most {max_files} files; this one has {len(parts)}.")
    return [part.read() for part in parts]
