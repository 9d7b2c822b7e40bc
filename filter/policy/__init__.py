"""The policy: typed schema with defaults, file loading with local.d drop-ins, TOML output."""

from filter.policy.loader import (
    LoadedPolicy,
    PolicyError,
    PolicyIssue,
    build_policy,
    default_config_path,
    load_policy,
)
from filter.policy.render import render_toml
from filter.policy.schema import DEFAULT_POLICY, Policy

__all__ = [
    "DEFAULT_POLICY",
    "LoadedPolicy",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "build_policy",
    "default_config_path",
    "load_policy",
    "render_toml",
]
