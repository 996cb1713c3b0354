"""Request bodies of the server (pydantic): they bound sizes and types; the prompts themselves are parsed by
``core.prompts.parse_prompts``, the one parser every front end shares."""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_LESIONS_PER_REQUEST = 512
MAX_FOLLOWUPS = 16
HASH_PATTERN = r"^[0-9a-f]{64}$"

# JSON object keys are strings: a lesion id is a positive decimal integer without leading zeros, < 2^31.
LesionId = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,9}$")]
ImageHash = Annotated[str, Field(pattern=HASH_PATTERN)]
FoldList = Annotated[List[Annotated[int, Field(strict=True, ge=0, le=99)]], Field(min_length=1, max_length=32)]
Folds = Optional[Union[Literal["all"], Annotated[int, Field(strict=True, ge=0, le=99)], FoldList]]
Prompts = Annotated[Dict[LesionId, Any], Field(min_length=1, max_length=MAX_LESIONS_PER_REQUEST,
                                                description="published prompt JSON per lesion id "
                                                            "(core.prompts.parse_prompts)")]


def _ids_in_range(v: Dict[str, Any]) -> Dict[str, Any]:
    for k in v:
        if int(k) >= 2**31:
            raise ValueError(f"lesion id {k} is not below 2^31")
    return v


class Settings(BaseModel):
    """What a request runs with; the client always says, so equal settings give equal masks."""

    model_config = ConfigDict(extra="forbid")
    folds: Folds = Field(default=None, description="null: the server's default folds (reported in /version)")
    tta: StrictBool = Field(default=False, description="mirroring test-time augmentation")
    grow: Optional[StrictBool] = Field(default=None, description="follow a lesion past its patch (null: the "
                                                                 "server's setting, reported in /version)")


class SegmentRequest(Settings):
    prompts: Prompts
    image: Optional[ImageHash] = Field(default=None, description="content hash of a session image; "
                                                                 "default: the last one set")
    probabilities: StrictBool = Field(default=False, description="also return float32 foreground "
                                                                 "probabilities on each lesion's box")
    _ids = field_validator("prompts")(_ids_in_range)


class TrackRequest(Settings):
    baseline: ImageHash
    followups: List[ImageHash] = Field(min_length=1, max_length=MAX_FOLLOWUPS)
    prompts: Prompts
    from_baseline: StrictBool = Field(default=False, description="prompt every follow-up from the baseline "
                                                                 "(default: autoregressive)")
    propagation: Optional[Literal["learned", "classical"]] = None
    refine: Optional[Literal["unet", "segment", "none"]] = None
    _ids = field_validator("prompts")(_ids_in_range)


class ReuseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hash: ImageHash
