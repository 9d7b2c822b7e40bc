"""The one list of check modules, and which of them a policy enables.

Each issue that brings a check adds one line here; the pipeline only ever sees the
instances this function returns. Order matters only for logs: dependencies between
checks are declared by each check's ``needs`` and resolved by the pipeline.
"""

from __future__ import annotations

from filter.checks import Check
from filter.checks.arc import ARCCheck
from filter.checks.dkim import DKIMCheck
from filter.checks.dmarc import DMARCCheck
from filter.checks.dnsbl import DNSBLCheck, DNSBLDomainCheck
from filter.checks.greylist import GreylistCheck
from filter.checks.helo import HeloCheck
from filter.checks.lists import list_checks
from filter.checks.ratelimit import RateLimitCheck, RateLimitConnectCheck
from filter.checks.rdns import RDNSCheck
from filter.checks.spf import SPFCheck
from filter.policy.schema import Policy


def build_checks(policy: Policy) -> list[Check]:
    """Instances of every check the policy enables, in registry order."""
    checks: list[Check] = []
    if policy.rdns.enabled:
        checks.append(RDNSCheck())
    if policy.helo.enabled:
        checks.append(HeloCheck())
    if policy.dnsbl.enabled:
        checks.append(DNSBLCheck())
        if any(z.type == "domain" for z in policy.dnsbl.zones):
            checks.append(DNSBLDomainCheck())
    if policy.spf.enabled:
        checks.append(SPFCheck())
    if policy.dkim.enabled:
        checks.append(DKIMCheck())
    if policy.arc.enabled:
        checks.append(ARCCheck())
    if policy.dmarc.enabled:
        checks.append(DMARCCheck())
    checks.extend(list_checks(policy))
    rl = policy.ratelimit
    if rl.enabled:
        if rl.connections_per_network:
            checks.append(RateLimitConnectCheck())
        counted = (
            rl.messages_per_network,
            rl.recipients_per_network,
            rl.messages_per_sender_domain,
            rl.recipients_per_sender_domain,
        )
        if any(counted):
            checks.append(RateLimitCheck())
    if policy.greylist.enabled:
        checks.append(GreylistCheck())
    return checks
