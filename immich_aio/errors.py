"""Errors that become HTTP responses: each carries its status and a message for the client."""

from __future__ import annotations


class PredictError(Exception):
    """A request that cannot be answered; `detail` says what was wrong and what is accepted."""

    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(PredictError):
    status = 400


class InvalidEntries(PredictError):
    status = 422


class PayloadTooLarge(PredictError):
    status = 413


class ModelLoadError(PredictError):
    status = 500


class ModelMissing(BadRequest):
    """A known name whose files are not in the store: the message names the fetch command."""


class InferenceError(PredictError):
    status = 500
