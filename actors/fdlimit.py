"""Raise the open-file limit at startup: one SSH transport per VM means ~1 descriptor per VM.

The common soft limit (1024) is reached at about a thousand instances, our stated scale; the hard
limit is what the administrator allows, so the service takes all of it and says how much it got.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("dispatch.fdlimit")


def raise_nofile_limit() -> int:
    """Set the soft RLIMIT_NOFILE to the hard limit; log and return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open file limit", extra={"soft": soft, "hard": hard, "error": str(e)})
    log.info("open file limit", extra={"RLIMIT_NOFILE": soft, "hard": hard})
    return soft
