"""Errors that become HTTP responses: each carries its status, a message for the client, and what it concerned.

The context (task, type, requested name, the model that would have served it) is filled in where
it is known, so the one log line written for every refusal says what an operator needs to act.
"""

from __future__ import annotations


def shown(text: str, limit: int = 80) -> str:
    """A client's string as a message or a log line may quote it: whole if short, else its start and its length
    (a name can be as long as the form allows; the log would otherwise grow by that much per request)."""
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} characters)"


class PredictError(Exception):
    """A request that cannot be answered; `detail` says what was wrong and what is accepted."""

    status = 500

    def __init__(self, detail: str, *, served: str | None = None, body: object = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.body = body  # the JSON sent instead of {"detail": detail}, where a protocol fixes its shape
        self.task: str | None = None
        self.type: str | None = None
        self.requested: str | None = None
        self.served = served

    def about(self, task: str, type_: str, requested: str, served: str | None = None) -> PredictError:
        """Attach the entry this error concerns (kept if already set by a more precise caller).

        Plain strings (a task enum becomes its wire name), so the refusal log reads as Immich's names."""
        self.task = self.task or str(task)
        self.type = self.type or str(type_)
        self.requested = self.requested or requested
        self.served = self.served or served
        return self


class BadRequest(PredictError):
    status = 400


class Unauthorized(PredictError):
    status = 401


class NotFound(PredictError):
    status = 404


class UndecodableImage(BadRequest):
    """The upload is not an image in an accepted format (or is cut short)."""


class RequestTimeout(PredictError):
    status = 408


class InvalidEntries(PredictError):
    status = 422


class PayloadTooLarge(PredictError):
    status = 413


class ServiceUnavailable(PredictError):
    """Busy or shutting down: the request was not run and may be sent again."""

    status = 503


class ModelLoadError(PredictError):
    status = 500


class ModelMissing(BadRequest):
    """A known name whose files are not in the store: the message names the fetch command.

    `plan` (a names.fetchable.FetchPlan) says what would be fetched for it, where fetching on first use is on.
    """

    def __init__(self, detail: str, *, served: str | None = None, plan: object = None) -> None:
        super().__init__(detail, served=served)
        self.plan = plan


class InferenceError(PredictError):
    status = 500


class ClientGone(PredictError):
    """The client closed the connection; nobody reads the answer (logged at INFO, never sent)."""

    status = 499
