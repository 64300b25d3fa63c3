"""Wire format of the judges' HTTP API: pydantic request/response models, limits and image decoding.

Every error a request can cause is an :class:`ApiError` with an HTTP status and a message that says
what is wrong; the ingress turns it into an OpenAI-style body ``{"error": {"message", "type", "code"}}``
so OpenAI clients show the message too.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from craft_ray.errors import UserError
from craft_ray.modalities import get_modality

MAX_PROMPTS = 32  # /v1/enrich: prompts per request
MAX_ITEMS = 16  # /v1/checklist: items per request; /v1/judge: items per request is 4x this
MAX_TEXT = 500  # characters of a question or id sent by a client
MAX_PAIRS_PER_IMAGE = 64  # /v1/p_yes: pairs per request = max_images x this
IMAGE_FORMATS = ("PNG", "JPEG")  # the only decoders a request can reach

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 422: "invalid_request_error", 500: "server_error",
               502: "engine_error", 503: "overloaded"}


class ApiError(Exception):
    """A request the server refuses or cannot answer: HTTP ``status`` and a message saying why."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


def error_body(status: int, message: str) -> dict:
    """OpenAI-style error body (what every non-2xx answer carries)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "code": status}}


@dataclass(frozen=True)
class Limits:
    """Request limits of the ingress (from ``judges.*``)."""

    max_request_bytes: int  # request body in bytes
    max_image_pixels: int  # width x height of one decoded image
    max_images: int  # images in one request


# ---------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrichRequest(_Strict):
    modality: str = Field(description="cxr | derm | fundus | histo")
    label: str = Field(description="label identifier of the dataset, e.g. cardiomegaly")
    dataset: str | None = Field(None, description="label set of the modality; null = the server's data.dataset")
    n: int = Field(8, ge=1, le=MAX_PROMPTS, description="number of prompts")
    seed: int | None = Field(None, description="seed of sampling (transformers engine with temperature > 0)")


class ChecklistRequest(_Strict):
    modality: str
    label: str
    dataset: str | None = None
    k: int = Field(6, ge=1, le=MAX_ITEMS, description="number of checklist items")


class JudgeItem(_Strict):
    id: str = Field(min_length=1, max_length=64)
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    present: str | None = None  # accepted so a /v1/checklist answer can be sent back as is; unused
    absent: str | None = None
    parent: str | None = None


class JudgeRequest(_Strict):
    modality: str
    label: str
    dataset: str | None = None
    images: list[str] = Field(min_length=1, description="base64 PNG/JPEG, or data:image/...;base64 URLs")
    items: list[JudgeItem] | None = Field(None, min_length=1, max_length=4 * MAX_ITEMS,
                                          description="checklist; null = the knowledge file's items of the label")


class PYesPair(_Strict):
    image: int = Field(ge=0, description="index into images")
    question: str = Field(min_length=1, max_length=MAX_TEXT)


class PYesRequest(_Strict):
    images: list[str] = Field(min_length=1)
    pairs: list[PYesPair] = Field(min_length=1)


# ---------------------------------------------------------------- responses
class EnrichResponse(BaseModel):
    model: str
    modality: str
    label: str
    dataset: str
    prompts: list[str]


class ChecklistItemOut(BaseModel):
    id: str
    question: str
    present: str
    absent: str
    parent: str | None = None


class ChecklistResponse(BaseModel):
    model: str
    modality: str
    label: str
    dataset: str
    items: list[ChecklistItemOut]


class ItemScore(BaseModel):
    id: str
    p_yes: float


class ImageJudgement(BaseModel):
    items: list[ItemScore]
    score: float  # mean P(yes) over the items
    gated_score: float  # same, a child counting 0 when its parent's P(yes) < 0.5 (DSG-style)


class JudgeResponse(BaseModel):
    model: str
    modality: str
    label: str
    dataset: str
    knowledge: str  # version of the knowledge file the items came from, or "request"
    results: list[ImageJudgement]  # one per image, in request order


class PYesResponse(BaseModel):
    model: str
    p_yes: list[float]  # one per pair, in request order


# ---------------------------------------------------------------- validation helpers
def check_label(modality: str, label: str, dataset: str) -> str:
    """The label's display words; ApiError 422 listing the known modalities, datasets or labels."""
    try:
        return get_modality(modality).label(label, dataset).display
    except UserError as exc:
        raise ApiError(422, str(exc)) from exc


def check_image_count(n: int, limits: Limits, what: str = "images") -> None:
    """413 when a request carries more than ``limits.max_images`` images."""
    if n > limits.max_images:
        raise ApiError(413, f"{n} {what} in one request; the limit is {limits.max_images} (judges.max_images): "
                            "split the request")


def decode_image(data: Any, limits: Limits, where: str) -> Image.Image:
    """RGB image from base64 PNG/JPEG (raw or a ``data:image/...;base64,`` URL); ApiError 400/413 otherwise.

    Only bytes inside the request are decoded: a string that is not base64 (a path, a URL) is refused,
    so no request can make the server read a file or fetch a URL.
    """
    if not isinstance(data, str):
        raise ApiError(400, f"{where} must be a base64 string, got {type(data).__name__}")
    payload = data
    if data.startswith("data:"):
        header, sep, payload = data.partition(",")
        if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: data URL header {header[:60]!r} must look like 'data:image/png;base64'")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} is not valid base64 (starts {data[:40]!r}); send the image bytes "
                            "base64-encoded (file paths and URLs are refused)") from None
    if not raw:
        raise ApiError(400, f"{where} is empty")
    try:
        img = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError:
        raise ApiError(413, f"{where} has too many pixels (decompression bomb)") from None
    except (OSError, ValueError):
        raise ApiError(400, f"{where} is not a PNG or JPEG image ({len(raw)} bytes decoded from base64)") from None
    pixels = img.width * img.height
    if pixels > limits.max_image_pixels:
        raise ApiError(413, f"{where} is {img.width}x{img.height} = {pixels} pixels; the limit is "
                            f"{limits.max_image_pixels} (judges.max_image_pixels): downscale it")
    try:
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"{where} is a truncated or corrupt {img.format} image ({exc})") from None


def check_chat_images(messages: list[dict], limits: Limits) -> None:
    """Apply the image limits to the ``image_url`` parts of chat messages (count, pixels, encoding)."""
    n = 0
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                n += 1
                check_image_count(n, limits, "image_url parts")
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str) or not url.startswith("data:"):
                    shown = url[:80] if isinstance(url, str) else type(url).__name__
                    raise ApiError(400, f"messages[{i}].content[{j}].image_url.url {shown!r} is not a data URL; "
                                        "send images inline as 'data:image/png;base64,...' (local paths, file:// "
                                        "and http(s):// URLs are refused)")
                decode_image(url, limits, f"messages[{i}].content[{j}].image_url.url")
