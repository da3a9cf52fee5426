"""How pydantic's validation errors become OpenAI-shaped 400s."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

from node.errors import invalid_from_validation, param_path


class _User(BaseModel):
    role: Literal["user"]
    content: str | list[dict]


class _Tool(BaseModel):
    role: Literal["tool"]
    content: str


class _Body(BaseModel):
    messages: list[_User | _Tool]
    logit_bias: dict[str, int] = {}


def _error(body: dict) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        _Body.model_validate(body)
    err = invalid_from_validation(info.value)
    assert err.status == 400
    return err.param, err.message


def test_union_members_and_type_tags_leave_the_path() -> None:
    param, message = _error({"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]})
    assert param == "messages[1].role"
    assert message.startswith("Invalid field 'messages[1].role': ")
    param, _ = _error({"messages": [{"role": "user", "content": None}]})
    assert param == "messages[0].content"


def test_dict_keys_and_plain_fields() -> None:
    assert _error({"messages": [], "logit_bias": {"50256": "x"}})[0] == "logit_bias.50256"
    assert _error({})[0] == "messages"
    assert param_path(("body", "model")) == "model"
    assert param_path(("timestamp_granularities", 0)) == "timestamp_granularities[0]"


class _Stop(BaseModel):
    stop: str | list[str] = Field(default_factory=list, max_length=4)


def test_a_union_names_the_member_the_value_was_meant_for() -> None:
    """A list that breaks the list member's rule is not reported as "not a string"."""
    with pytest.raises(ValidationError) as info:
        _Stop.model_validate({"stop": ["a"] * 5})
    err = invalid_from_validation(info.value)
    assert err.param == "stop" and "at most 4" in err.message
    with pytest.raises(ValidationError) as info:
        _Stop.model_validate({"stop": [1]})
    err = invalid_from_validation(info.value)
    assert err.param == "stop[0]" and "valid string" in err.message
    with pytest.raises(ValidationError) as info:
        _Stop.model_validate({"stop": 3})
    assert invalid_from_validation(info.value).param == "stop"
