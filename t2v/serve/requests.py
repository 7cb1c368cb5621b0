"""The job API's request bodies, one pydantic model per route that takes one: POST /v1/videos (`VideoRequest`)
and POST /v1/programs (`ProgramRequest`, its spec one of `SPECS`). Each field's type and every bound that does
not depend on the served model is checked here, at the edge, before anything is planned or queued; the
model's own limits (length, size, tokens: `long_video.limits`, `params.resolve`) follow in the generator's
`validate`, still before the job is queued. `parse` turns pydantic's errors into the `InputError` the API
answers 400 with, naming the field: that mapping lives here only.

Types are strict: a list or an object where text or a number is expected is an error, never coerced. The one
leniency is numbers written as decimal text, because form posts (the OpenAI client's multipart) carry every
value as a string and OpenAI's own `seconds` is a string in JSON too; "" means unset, as forms send it.
Unknown top-level fields are ignored (the API always has); a programme spec's unknown keys are refused, as
`check_spec` refuses them.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import InputError
from ..images import MAX_BYTES as MAX_IMAGE_BYTES
from ..lora import MAX_STRENGTH as MAX_LORA_STRENGTH
from ..params import FALSE_WORDS, MAX_FPS, MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, TRUE_WORDS
from ..production.postprocess import INTERPOLATIONS, MAX_SMOOTH
from ..production.programs import CLIP_SECONDS, KINDS, MAX_CLIPS, MAX_TEXT_CHARS
from .store import MAX_PRIORITY

# Longer than any model here makes (the served model's own limit is checked against its bundle), short enough
# that seconds x fps is a small frame count whatever the fps.
MAX_SECONDS = 600.0
MAX_NAME_CHARS = 200  # a model or sampler name
MAX_NUMBER_CHARS = 64  # decimal text longer than this is no number any field takes
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # no inf, nan, 0x.., 1_000
_SIZE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", re.ASCII)


# --- field types ------------------------------------------------------------------------------------------

def _from_text(value: Any) -> Any:
    """Decimal text -> its number; anything else as it came, for the strict type to judge. A number must be
    finite: NaN and infinities (JSON's NaN, "1e999") would slip past every bound."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMBER_CHARS or not _DECIMAL.fullmatch(text):
            raise ValueError("must be a number")
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _to_float(value: Any) -> Any:
    value = _from_text(value)
    if type(value) is int and abs(value) >= 2**1023:  # no float holds it (float() would raise)
        raise ValueError("is too large")
    return value


def _to_int(value: Any) -> Any:
    value = _from_text(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value  # 2.0 is 2, 2.5 is not


def _flag(value: Any) -> Any:
    """true/false, 0/1, or their words as forms and the generator's own parsing spell them."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"must be true or false ({', '.join(TRUE_WORDS + FALSE_WORDS)})")
    return bool(value) if type(value) is int and value in (0, 1) else value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _size(value: str) -> str:
    match = _SIZE.fullmatch(value)
    if not match:
        raise ValueError("must be WIDTHxHEIGHT, e.g. 128x128")
    return f"{int(match[1])}x{int(match[2])}"


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError(f"must be odd (a window centred on each frame), 1 to {MAX_SMOOTH}")
    return value


def _image_bytes(value: Any) -> Any:
    """input_reference as OpenAI's API takes it: a file upload (multipart, as the openai client sends a file)
    or a reference object {"image_url": ...}, here a base64 data URL (t2v fetches no URLs; it has no Files
    API for a file_id)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        value = {"image_url": value}
    if not isinstance(value, dict):
        raise ValueError("must be an image file or {\"image_url\": \"data:image/...;base64,...\"}")
    if value.get("file_id"):
        raise ValueError("file_id is not supported (t2v has no Files API): upload the image, or send a data URL")
    url = value.get("image_url")
    head, sep, data = (url or "").partition(",")
    if not (isinstance(url, str) and sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError("image_url must be a data:image/...;base64 URL (t2v fetches no URLs)")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:  # before decoding it
        raise ValueError(f"is over {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise ValueError("image_url is not valid base64") from None


ImageBytes = Annotated[bytes, BeforeValidator(_image_bytes), Field(max_length=MAX_IMAGE_BYTES)]
# A request's images -> their keys in a job's parameters (the pipeline's image= and last_image=).
IMAGE_FIELDS = {"input_reference": "image", "last_frame_reference": "last_image"}


def number(ge: float | None = None, le: float | None = None, gt: float | None = None):
    return Annotated[float, BeforeValidator(_to_float), Field(ge=ge, gt=gt, le=le, allow_inf_nan=False)]


def integer(ge: int, le: int):
    return Annotated[int, BeforeValidator(_to_int), Field(ge=ge, le=le)]


def text(max_length: int, min_length: int = 0):
    """Text of at most max_length characters (strict str also refuses a lone surrogate, JSON's "\\ud800")."""
    return Annotated[str, Field(min_length=min_length, max_length=max_length)]


def optional(kind):
    """An optional field: null or "" (a form's empty input) is unset."""
    return Annotated[kind | None, BeforeValidator(lambda v: None if v == "" else v)]


Prompt = Annotated[text(MAX_PROMPT_CHARS, min_length=1), AfterValidator(_not_blank)]
Caption = text(MAX_TEXT_CHARS)
Name = text(MAX_NAME_CHARS)
Flag = Annotated[bool, BeforeValidator(_flag)]


# --- the bodies -------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class LoraChoice(_Strict):
    """A video's LoRA adapter: an adapter name under the server's adapters root, and the strength its update is
    scaled by (1: as trained)."""

    name: Name
    strength: optional(number(ge=-MAX_LORA_STRENGTH, le=MAX_LORA_STRENGTH)) = None


def _lora(value: Any) -> Any:
    """`"desert"` or `"desert:0.8"` (a form's single field) as {"name", "strength"}."""
    if isinstance(value, str):
        name, sep, strength = value.rpartition(":")
        return {"name": name, "strength": strength} if sep else {"name": value}
    return value


class _Job(_Strict):
    """What every job takes: the model it asks for, its place in the queue and the sampler's settings."""

    model: optional(Name) = None  # the served model, or "<model>+<adapter>"
    lora: optional(Annotated[LoraChoice, BeforeValidator(_lora)]) = None
    priority: optional(integer(0, MAX_PRIORITY)) = None
    seed: optional(integer(0, MAX_SEED)) = None
    num_inference_steps: optional(integer(1, MAX_STEPS)) = None
    guidance_scale: optional(number(ge=0, le=MAX_GUIDANCE)) = None
    guidance_scale_2: optional(number(ge=0, le=MAX_GUIDANCE)) = None  # a mixture of experts' low-noise steps


class VideoRequest(_Job):
    """POST /v1/videos: OpenAI's fields (prompt, seconds, size, model), t2v's, and the post-processing."""

    prompt: Prompt
    negative_prompt: optional(text(MAX_PROMPT_CHARS)) = None
    seconds: optional(number(gt=0, le=MAX_SECONDS)) = None
    size: optional(Annotated[text(32), AfterValidator(_size)]) = None
    fps: optional(number(gt=0, le=MAX_FPS)) = None
    sampler: optional(Name) = None
    optimize_prompt: optional(Flag) = None
    keyframe_fps: optional(number(gt=0, le=MAX_FPS)) = None
    interpolate: optional(Literal[INTERPOLATIONS]) = None
    motion_blur: optional(number(ge=0, le=1)) = None
    smooth: optional(Annotated[integer(1, MAX_SMOOTH), AfterValidator(_odd)]) = None
    color_match: optional(Flag) = None
    input_reference: optional(ImageBytes) = None  # the video's first frame
    last_frame_reference: optional(ImageBytes) = None  # its last frame (a first-last-frame model)


class ProgramRequest(_Job):
    """POST /v1/programs: a programme's kind and its spec (checked against `SPECS[kind]` by `program_fields`)."""

    kind: Literal[KINDS]
    spec: dict[str, Any]


class _Clip(_Strict):  # other keys of a clip are ignored, as check_spec ignores them
    prompt: Prompt
    seconds: optional(number(ge=CLIP_SECONDS[0], le=CLIP_SECONDS[1])) = None


class _Section(_Clip):
    text: optional(Caption) = None


class _NewsItem(_Clip):
    caption: optional(Caption) = None


def clip_list(kind):
    return Annotated[list[kind], Field(min_length=1, max_length=MAX_CLIPS)]


class _Spec(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class EducationSpec(_Spec):
    title: Caption
    sections: clip_list(_Section)
    summary: optional(Caption) = None


class AdSpec(_Spec):
    brand: Caption
    clips: clip_list(_Clip)
    call_to_action: Caption


class NewsSpec(_Spec):  # fields in check_spec's order, so the same missing key is reported first
    headline: Caption
    items: clip_list(_NewsItem)
    ticker: Caption


# Spec keys the CLI takes but the API refuses: `logo` is a path the server would open, i.e. any image on the
# server's disk (other tenants' thumbnails included). Being extra fields, they are refused by name.
CLI_ONLY_SPEC_KEYS = {"ad": {"logo"}}
SPECS = {"education": EducationSpec, "ad": AdSpec, "news": NewsSpec}  # the keys of programs.SPEC_KEYS (a test checks)


# --- parsing -----------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def param_of(loc) -> str:
    """A pydantic error's location as the API names fields: `items[0].seconds`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


def invalid(errors: list[dict]) -> InputError:
    """pydantic's (or FastAPI's) first error as the InputError the API answers 400 with."""
    error = errors[0]
    return InputError(param_of(error["loc"]), error["msg"].removeprefix("Value error, "))


def parse(model: type[M], fields: Any) -> M:
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise invalid(e.errors(include_url=False, include_input=False)) from None


def adapter_fields(fields: dict) -> tuple[str | None, dict | None]:
    """A job body's `model` and `lora` fields, checked (the job service chooses the adapter before anything
    else is validated)."""
    request = parse(_Job, fields)
    return request.model, None if request.lora is None else request.lora.model_dump(exclude_none=True)


def video_fields(fields: dict) -> dict:
    """POST /v1/videos' body, checked: the fields the job service and the generator read, unset ones left out."""
    return parse(VideoRequest, fields).model_dump(exclude_none=True)


def program_fields(fields: dict) -> dict:
    """POST /v1/programs' body, checked. A spec's fields are named bare (`items`, `items[0].seconds`), as
    check_spec names a spec's keys."""
    request = parse(ProgramRequest, fields)
    spec = parse(SPECS[request.kind], request.spec)
    return {**request.model_dump(exclude_none=True), "spec": spec.model_dump(exclude_none=True)}
