"""Polling ARM long-running operations the way Go's go-autorest does: through poll errors.

azure-mgmt's ARMPolling fails the whole operation on the first status poll that answers 429 or 5xx,
and the driver then took the create for failed and deleted the VM and NIC that ARM was still
building. Go keeps polling with back-off and never deletes on a poll error. :class:`PatientARMPolling`
retries a throttled or failing status poll (Retry-After when ARM sends one, else Go's 60 s polling
delay) until the operation's deadline, and records whether the operation reached a terminal
``Failed``/``Canceled`` status, which is the only poll outcome after which cleaning up is right.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from azure.core.exceptions import AzureError
from azure.core.polling.base_polling import BadStatus
from azure.mgmt.core.polling.arm_polling import ARMPolling

from cloud.azure.errors import retry_after

GO_POLLING_DELAY = 60.0  # go-autorest's DefaultPollingDelay: the wait when ARM sends no Retry-After
RETRIED_POLL_STATUSES = frozenset({429, 500, 502, 503, 504})


class PatientARMPolling(ARMPolling):
    """ARMPolling that retries a 429/5xx or unreachable status poll until ``deadline`` (monotonic).

    After the poller finishes, ``terminal_failure`` says whether ARM reported the operation
    ``Failed``/``Canceled`` (its resources may be cleaned up); ``poll_errors`` counts retried polls.
    """

    def __init__(self, interval: float, *, deadline: float, retry_delay: float = GO_POLLING_DELAY,
                 stopping: Callable[[], bool] = lambda: False, **kwargs):
        super().__init__(timeout=interval, **kwargs)
        self._deadline = deadline
        self._retry_delay = retry_delay
        self._stopping = stopping
        self._next_delay: float | None = None
        self.poll_errors = 0
        self.terminal_failure = False

    def update_status(self) -> None:
        try:
            super().update_status()
        except (BadStatus, AzureError) as e:
            response = getattr(self._pipeline_response, "http_response", None)
            status = response.status_code if isinstance(e, BadStatus) and response is not None else None
            retryable = status in RETRIED_POLL_STATUSES or not isinstance(e, BadStatus)
            if not retryable or self._stopping() or time.monotonic() >= self._deadline:
                raise
            self.poll_errors += 1
            header = response.headers.get("Retry-After") if status is not None else None
            at = retry_after(header, time.time())
            self._next_delay = max(0.0, at - time.time()) if at is not None else self._retry_delay
            # the operation is still in progress as far as we know: keep the previous status
            return
        if self.status().lower() in ("failed", "canceled", "cancelled"):
            self.terminal_failure = True

    def _delay(self) -> None:
        if self._next_delay is None:
            return super()._delay()
        delay, self._next_delay = self._next_delay, None
        self._sleep(max(0.0, min(delay, self._deadline - time.monotonic())))
