"""Reading request bodies with the upload bounded in size and time while it streams in.

File parts stay in Starlette's spooled temporary files (memory up to 1 MB, disk beyond), so a
queued request holds its upload, not a second copy of it; the image is decoded from that file
when its turn comes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from immich_aio.errors import BadRequest, ClientGone, PayloadTooLarge, RequestTimeout, shown

FIELD_SLACK = 1024 * 1024  # room for `entries`, `text` and multipart headers beside the image


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, BinaryIO] = field(default_factory=dict)  # spooled uploads, positioned anywhere
    filenames: dict[str, str] = field(default_factory=dict)  # as the client named each upload


@dataclass(frozen=True)
class ReadLimits:
    max_upload_bytes: int
    gap_s: float  # longest silence between two chunks of the body
    total_s: float = 300.0  # the whole body, like Node's default request timeout on Immich's side


async def _bounded(request: Request, limits: ReadLimits) -> AsyncGenerator[bytes, None]:
    limit = limits.max_upload_bytes + FIELD_SLACK
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large(int(declared), limit))
    total = 0
    deadline = time.monotonic() + limits.total_s
    chunks = request.stream().__aiter__()
    while True:
        wait = min(limits.gap_s, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except ClientDisconnect:
            raise ClientGone(f"the client closed the connection while sending its request ({total} bytes in)") from None
        except TimeoutError:
            raise RequestTimeout(
                f"The request body stopped arriving ({total} bytes in; no data for {limits.gap_s:g} s or more than "
                f"{limits.total_s:g} s in all, IMMICH_AIO_BODY_TIMEOUT_S)"
            ) from None
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(_too_large(total, limit))
        yield chunk


def _too_large(size: int, limit: int) -> str:
    mb = (limit - FIELD_SLACK) / 1024 / 1024
    return f"Upload of {size} bytes or more exceeds the limit of {mb:g} MB (IMMICH_AIO_MAX_UPLOAD_MB)"


@asynccontextmanager
async def read_form(request: Request, limits: ReadLimits, endpoint: str = "/predict") -> AsyncIterator[Form]:
    """The parsed multipart (or urlencoded) body; its spooled files are closed when the block ends."""
    content_type = request.headers.get("content-type", "")
    stream = _bounded(request, limits)
    try:
        if content_type.startswith("multipart/form-data"):
            parsed = await MultiPartParser(request.headers, stream, max_files=4, max_fields=16).parse()
        elif content_type.startswith("application/x-www-form-urlencoded"):
            parsed = await FormParser(request.headers, stream, max_fields=16).parse()
        else:
            raise BadRequest(
                f"{endpoint} expects multipart/form-data; got content type {shown(content_type or 'none')!r}"
            )
    except MultiPartException as e:
        raise BadRequest(f"Malformed multipart body: {e.message}") from e
    finally:
        await stream.aclose()
    try:
        form = Form()
        for name, value in parsed.multi_items():
            if isinstance(value, UploadFile):
                if value.size is not None and value.size > limits.max_upload_bytes:
                    raise PayloadTooLarge(_too_large(value.size, limits.max_upload_bytes + FIELD_SLACK))
                form.files.setdefault(name, value.file)
                form.filenames.setdefault(name, (value.filename or "")[:200])
            else:
                form.fields.setdefault(name, value)
        yield form
    finally:
        await parsed.close()


async def read_small_field(form: Form, name: str) -> str | None:
    """A text value sent either as a plain field or as a (small) file part."""
    if name in form.fields:
        return form.fields[name]
    f = form.files.get(name)
    if f is None:
        return None
    f.seek(0)
    return f.read(FIELD_SLACK).decode("utf-8", errors="replace")
