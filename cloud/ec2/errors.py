"""EC2 error codes -> the dispatcher's error protocol, as Arvados ``lib/cloud/ec2`` maps them.

Pure functions of (code, message), tested with tables; :func:`wrap` turns a botocore exception
into the typed error, and :class:`Backoff` holds the growing delay Go keeps per call kind.
"""

from __future__ import annotations

import re
import threading

from cloud.base import CapacityError, CloudError, QuotaError, RateLimitError

# aws-sdk-go-v2 retry.DefaultThrottleErrorCodes: Go treats exactly these as rate limits.
THROTTLE_CODES = frozenset((
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException",
))
# The account cannot have more instances (of any type) until some go away.
QUOTA_CODES = frozenset((
    "InstanceLimitExceeded", "InsufficientAddressCapacity", "InsufficientFreeAddressesInSubnet",
    "InsufficientVolumeCapacity", "MaxSpotInstanceCountExceeded",
))
_SUBNET_MESSAGE = re.compile(r"( subnet |sufficient free [Ii]pv[46] addresses)", re.S)

THROTTLE_MIN = 1.0
THROTTLE_MAX = 60.0


class EC2RateLimitError(RateLimitError):
    pass


class EC2QuotaError(QuotaError):
    pass


class EC2CapacityError(CapacityError):
    pass


def is_subnet_specific(code: str, message: str) -> bool:
    """Might RunInstances succeed in another subnet? (Go's isErrorSubnetSpecific)"""
    return ("Subnet" in code
            or code in ("InsufficientInstanceCapacity", "InsufficientVolumeCapacity", "Unsupported")
            or ("InvalidParameter" in code and bool(_SUBNET_MESSAGE.search(message))))


def capacity(code: str, message: str) -> tuple[bool, bool]:
    """(instance-type-specific, quota-group-specific) capacity error? (Go's isErrorCapacity)"""
    if code == "VcpuLimitExceeded":
        return False, True
    if code == "InsufficientInstanceCapacity" or (code == "Unsupported" and "requested instance type" in message):
        return True, False
    return False, False


class Backoff:
    """Go's throttle delay for one call kind: ``d*3/2 + 1s`` per throttle, clamped to [1s, 60s];
    any other outcome resets it."""

    def __init__(self):
        self._d = 0.0
        self._lock = threading.Lock()

    def throttled(self) -> float:
        with self._lock:
            self._d = min(THROTTLE_MAX, max(THROTTLE_MIN, self._d * 1.5 + 1.0))
            return self._d

    def reset(self) -> None:
        with self._lock:
            self._d = 0.0

    @property
    def delay(self) -> float:
        return self._d


def classify(code: str, message: str, now: float, backoff: Backoff | None) -> CloudError:
    """The typed error for one EC2 error response (Go's wrapError, same order of checks)."""
    text = f"{code}: {message}" if code else message
    if code in THROTTLE_CODES:
        d = backoff.throttled() if backoff is not None else THROTTLE_MIN
        return EC2RateLimitError(text, now + d)
    if backoff is not None:
        backoff.reset()
    if code in QUOTA_CODES:
        return EC2QuotaError(text)
    inst, group = capacity(code, message)
    if inst or group:
        return EC2CapacityError(text, instance_type_specific=inst, quota_group_specific=group)
    return CloudError(text)


def error_fields(err: BaseException) -> tuple[str, str]:
    """(code, message) of a botocore ClientError; ("", str) for anything else."""
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        e = resp.get("Error") or {}
        return str(e.get("Code") or ""), str(e.get("Message") or "")
    return "", f"{type(err).__name__}: {err}"


def wrap(err: BaseException, now: float, doing: str, backoff: Backoff | None = None) -> CloudError:
    """A CloudError subclass for any boto3 failure, prefixed with what we were doing."""
    if isinstance(err, CloudError):
        return err
    code, message = error_fields(err)
    typed = classify(code, message, now, backoff)
    typed.args = (f"{doing}: {typed.args[0]}",)
    return typed
