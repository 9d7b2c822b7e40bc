"""The one list of check modules, and which of them a policy enables.

Each issue that brings a check adds one line here; the pipeline only ever sees the
instances this function returns.
"""

from __future__ import annotations

from filter.checks import Check
from filter.policy.schema import Policy


def build_checks(policy: Policy) -> list[Check]:
    """Instances of every check the policy enables, in registry order."""
    checks: list[Check] = []
    return checks
