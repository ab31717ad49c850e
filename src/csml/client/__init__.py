"""The Python SDK: everything a user does, over the REST API only."""

from csml.client.errors import (
    Conflict,
    CsmlError,
    InvalidRequest,
    NotFound,
    QueueFull,
    RateLimited,
    ServerError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unreachable,
    WaitTimeout,
)
from csml.client.sdk import Client, Job

__all__ = [
    "Client",
    "Conflict",
    "CsmlError",
    "InvalidRequest",
    "Job",
    "NotFound",
    "QueueFull",
    "RateLimited",
    "ServerError",
    "TooLarge",
    "TooManyRequests",
    "Unauthorized",
    "Unreachable",
    "WaitTimeout",
]
