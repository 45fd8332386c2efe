"""Turning ARM failures into the dispatcher's error protocol (rate limit, quota, capacity).

Pure functions: the decision depends only on the status, headers and ARM error body, so it is tested
with a table and reused by every call site in :mod:`cloud.azure.driver`.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

from azure.core.exceptions import AzureError, HttpResponseError

from cloud.base import CapacityError, CloudError, QuotaError, RateLimitError

DEFAULT_RATE_LIMIT_DELAY = 20.0  # Arvados' default; it panics instead when a 429 has no Retry-After
_QUOTA = re.compile(r"exceed|quota|limit", re.IGNORECASE)
# Spot VMs draw on their own regional quota ("exceeding approved Low Priority Cores quota",
# "Total Regional Low-priority vCPUs"): running out of it must not stop regular instances.
_SPOT_QUOTA = re.compile(r"low[- ]?priority|\bspot\b", re.IGNORECASE)
# ARM codes that mean "no capacity for this size here now" rather than "your account is full".
CAPACITY_CODES = frozenset(c.lower() for c in (
    "AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest", "SkuNotAvailable", "AllocationFailedInZone",
    "SpotAllocationFailed", "SkuNotAvailableInZone",
))


class AzureRateLimitError(RateLimitError):
    pass


class AzureQuotaError(QuotaError):
    pass


class AzureCapacityError(CapacityError):
    pass


def retry_after(value: str | None, now: float) -> float | None:
    """Unix time from a Retry-After header: integer seconds or an HTTP-date; None if unparseable."""
    if not value:
        return None
    v = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", v):
        return now + float(v)
    try:
        return parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def error_fields(err: HttpResponseError) -> tuple[int | None, str, str, str | None]:
    """(status, ARM error code, ARM error message, Retry-After header) of an SDK error."""
    status = getattr(err, "status_code", None)
    code = getattr(getattr(err, "error", None), "code", None) or ""
    message = getattr(getattr(err, "error", None), "message", None) or getattr(err, "message", "") or str(err)
    resp = getattr(err, "response", None)
    headers = getattr(resp, "headers", None) or {}
    return status, code, message, headers.get("Retry-After")


def classify(status: int | None, code: str, message: str, retry_after_header: str | None,
             now: float) -> CloudError:
    """The typed error for one ARM failure (a new exception; the caller chains the original)."""
    text = f"{code}: {message}" if code else message
    if status is not None:
        text = f"HTTP {status}: {text}"
    # Retry-After means "slow down" only on an error answer: ARM also sends it on every status poll,
    # including the 200 that reports a failed operation (an AllocationFailed is not a rate limit)
    if status == 429 or (retry_after_header and status is not None and status >= 400):
        at = retry_after(retry_after_header, now)
        return AzureRateLimitError(text, at if at is not None else now + DEFAULT_RATE_LIMIT_DELAY)
    if code.lower() in CAPACITY_CODES:
        return AzureCapacityError(text, instance_type_specific=True)
    if _QUOTA.search(code) or _QUOTA.search(message):
        if _SPOT_QUOTA.search(message):
            # scoped to the spot quota group (AzureInstanceSet.instance_quota_group)
            return AzureCapacityError(text, quota_group_specific=True)
        return AzureQuotaError(text)
    return CloudError(text)


def wrap(err: BaseException, now: float, doing: str) -> CloudError:
    """A CloudError subclass for any SDK failure, its message prefixed with what we were doing."""
    if isinstance(err, CloudError):
        return err
    if isinstance(err, HttpResponseError):
        status, code, message, ra = error_fields(err)
        typed = classify(status, code, message, ra, now)
        typed.args = (f"{doing}: {typed.args[0]}",)
        return typed
    if isinstance(err, AzureError):
        return CloudError(f"{doing}: {type(err).__name__}: {err.message if hasattr(err, 'message') else err}")
    return CloudError(f"{doing}: {type(err).__name__}: {err}")
