"""The API's error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Messages are the real API's wording, so clients that classify errors (by status, ``type``
and ``code``) behave here as they would against OpenAI.
"""

from __future__ import annotations

from typing import Any

SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
OVERLOADED = "The engine is currently overloaded, please try again later."
QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field "
    "(with blank username) if you're accessing the API from your browser and are prompted for "
    "a username and password. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)


class SimAPIError(Exception):
    """An error answer: raised inside handlers, rendered by the app's middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The API's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def gateway_body(error: SimAPIError) -> dict[str, Any]:
    """A rate-limit 429 as a LiteLLM proxy passes it on: the upstream's message wrapped,
    ``type`` ``throttling_error`` and ``code`` ``"429"`` (a string)."""
    message = f"litellm.RateLimitError: RateLimitError: OpenAIException - {error.message}"
    return error_body(message, "throttling_error", error.param, "429")


def mask_key(key: str) -> str:
    """Mask an API key like the API does (``sk-te****1234``): at most 4 trailing characters.

    Short keys show less, so that a masked key never gives most of itself away.
    """
    if len(key) >= 16:
        return f"{key[:5]}{'*' * 4}{key[-4:]}"
    if len(key) >= 8:
        return f"{key[:2]}{'*' * 4}{key[-2:]}"
    return "*" * 4


def invalid_key(key: str) -> SimAPIError:
    return SimAPIError(
        401,
        f"Incorrect API key provided: {mask_key(key)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


def missing_key() -> SimAPIError:
    return SimAPIError(401, NO_KEY, code="invalid_api_key")


def model_not_found(model: str) -> SimAPIError:
    return SimAPIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def no_access(model: str) -> SimAPIError:
    return SimAPIError(
        403,
        f"Project `proj_sim` does not have access to model `{model}`",
        code="model_not_found",
    )


def missing_param(param: str) -> SimAPIError:
    return SimAPIError(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def invalid_type(param: str, expected: str, got: Any) -> SimAPIError:
    return SimAPIError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {json_type(got)} instead.",
        param=param,
        code="invalid_type",
    )


def invalid_value(param: str, value: Any, supported: list[str]) -> SimAPIError:
    listed = ", ".join(f"'{s}'" for s in supported)
    return SimAPIError(
        400,
        f"Invalid value: '{value}'. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


def below_min(param: str, value: float, minimum: float, *, integer: bool) -> SimAPIError:
    kind = "integer" if integer else "decimal"
    return SimAPIError(
        400,
        f"Invalid '{param}': {kind} below minimum value. Expected a value >= {minimum:g}, "
        f"but got {value:g} instead.",
        param=param,
        code=f"{kind}_below_min_value",
    )


def above_max(param: str, value: float, maximum: float, *, integer: bool) -> SimAPIError:
    kind = "integer" if integer else "decimal"
    return SimAPIError(
        400,
        f"Invalid '{param}': {kind} above maximum value. Expected a value <= {maximum:g}, "
        f"but got {value:g} instead.",
        param=param,
        code=f"{kind}_above_max_value",
    )


def not_found_object(kind: str, object_id: str) -> SimAPIError:
    return SimAPIError(404, f"No such {kind} object: {object_id}", param="id")


def json_type(value: Any) -> str:
    """The JSON type name of ``value`` as the API's messages spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
