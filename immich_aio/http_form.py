"""Reading the `/predict` form with the upload bounded while it streams in."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from immich_aio.errors import BadRequest, PayloadTooLarge

FIELD_SLACK = 1024 * 1024  # room for `entries`, `text` and multipart headers beside the image


@dataclass
class PredictForm:
    entries: str | None
    image: bytes | None
    text: str | None


async def _bounded(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large(int(declared), limit))
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(_too_large(total, limit))
        yield chunk


def _too_large(size: int, limit: int) -> str:
    mb = (limit - FIELD_SLACK) / 1024 / 1024
    return f"Upload of {size} bytes or more exceeds the limit of {mb:g} MB (IMMICH_AIO_MAX_UPLOAD_MB)"


async def read_form(request: Request, max_upload_bytes: int) -> PredictForm:
    content_type = request.headers.get("content-type", "")
    stream = _bounded(request, max_upload_bytes + FIELD_SLACK)
    try:
        if content_type.startswith("multipart/form-data"):
            form = await MultiPartParser(request.headers, stream, max_files=4, max_fields=16).parse()
        elif content_type.startswith("application/x-www-form-urlencoded"):
            form = await FormParser(request.headers, stream, max_fields=16).parse()
        else:
            raise BadRequest(
                f"/predict expects multipart/form-data with 'entries' and 'image' or 'text'; "
                f"got content type {content_type or 'none'!r}"
            )
    except MultiPartException as e:
        raise BadRequest(f"Malformed multipart body: {e.message}") from e

    try:
        entries = form.get("entries")
        if isinstance(entries, UploadFile):
            entries = (await entries.read()).decode("utf-8", errors="replace")
        image_part = form.get("image")
        image: bytes | None = None
        if isinstance(image_part, UploadFile):
            if image_part.size is not None and image_part.size > max_upload_bytes:
                raise PayloadTooLarge(_too_large(image_part.size, max_upload_bytes + FIELD_SLACK))
            image = await image_part.read()
        elif isinstance(image_part, str) and image_part:
            raise BadRequest("'image' must be a file part (the raw image bytes), not a text field")
        text = form.get("text")
        if isinstance(text, UploadFile):
            text = (await text.read()).decode("utf-8", errors="replace")
    finally:
        await form.close()
    return PredictForm(entries=entries, image=image or None, text=text if text else None)
