"""AWS value formats checked in more than one place (the config, the AWS runner, the local
interpreter), each written once: IAM role ARNs and ISO 8601 durations.

Neutral: imports nothing of the project.
"""
from __future__ import annotations

import re

# arn:<partition>:iam::<account>:role/<optional path/><name>; groups: account, role name.
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/(?:[\w+=,.@/-]+/)?([\w+=,.@-]{1,64})\Z", re.ASCII)

# ISO 8601 durations as CacheConfig.ExpireAfter takes them (P30D, PT1H, P1DT12H): at least one
# component, and a T only before a time component. Groups: Y, M, W, D, H, M, S.
ISO_DURATION = re.compile(r"^P(?=\d|T\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
                          r"(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?\Z")


def duration_seconds(text: str) -> int | None:
    """An ISO_DURATION in seconds (a year 365 days, a month 30), or None if it is not one."""
    m = ISO_DURATION.match(text)
    if not m:
        return None
    y, mo, w, d, h, mi, s = (int(g or 0) for g in m.groups())
    return (((y * 365 + mo * 30 + w * 7 + d) * 24 + h) * 60 + mi) * 60 + s
