"""Read the main policy file and its ``local.d`` drop-ins, merge, validate.

Errors are collected, not raised one at a time: ``mailgate policy check`` shows
every problem in one run, each against the file that set the offending value,
as ``file: key: message``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filter.policy.schema import Policy, policy_from_dict

CONFIG_ENV = "MAILGATE_CONFIG"
_REPO_POLICY = Path(__file__).resolve().parents[2] / "policies" / "mailgate.toml"
# No policy key nests more than a few levels; thousands are a broken file, not a traceback.
_TOO_DEEP = "tables or arrays nested too deeply"


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in the policy, located by file and dotted key (``-`` when no key applies)."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


class PolicyError(Exception):
    """The policy was refused; ``issues`` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy, the files it came from (in merge order) and the raw merged TOML."""

    policy: Policy
    files: tuple[Path, ...]
    merged: dict[str, Any]


def default_config_path() -> Path:
    """``$MAILGATE_CONFIG``, else ``policies/mailgate.toml`` under the CWD, else the
    checkout's when mailgate runs from one (an installed package has none beside it:
    then the relative path, so a missing file is reported as the contract names it)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    local = Path("policies") / "mailgate.toml"
    if local.is_file() or not _REPO_POLICY.is_file():
        return local
    return _REPO_POLICY


def dropin_files(main: Path, issues: list[PolicyIssue]) -> list[Path]:
    """``<dir of main>/local.d/*.toml`` in byte order of their names (``ls`` in the C locale).

    Hidden files are editor leftovers, anything but a file or a symlink is skipped. A
    dangling symlink is kept, so that reading it reports it, and a ``local.d`` that
    exists but cannot be listed is an issue: either way the admin's overrides would
    otherwise silently not apply.
    """
    directory = main.parent / "local.d"
    try:
        with os.scandir(directory) as entries:
            found = [Path(e.path) for e in entries if _is_dropin(e)]
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        where = f"drop-ins go in {directory}/*.toml"
        issues.append(PolicyIssue(str(directory), "-", f"not a directory ({where})"))
        return []
    except OSError as exc:
        issues.append(PolicyIssue(str(directory), "-", f"cannot read: {exc.strerror or exc}"))
        return []
    return sorted(found, key=lambda p: os.fsencode(p.name))


def _is_dropin(entry: os.DirEntry[str]) -> bool:
    if entry.name.startswith(".") or not entry.name.endswith(".toml"):
        return False
    try:
        return entry.is_file() or (entry.is_symlink() and not entry.is_dir())
    except OSError:  # a symlink loop: reading it reports it
        return True


def _read_toml(path: Path, issues: list[PolicyIssue], main: bool) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        if main and isinstance(exc, FileNotFoundError):
            message += _missing_hint(path)
        issues.append(PolicyIssue(str(path), "-", message))
    except tomllib.TOMLDecodeError as exc:
        issues.append(PolicyIssue(str(path), "-", f"TOML syntax error: {exc}"))
    except RecursionError:  # tomllib recurses per nested array
        issues.append(PolicyIssue(str(path), "-", _TOO_DEEP))
    except UnicodeDecodeError as exc:
        issues.append(PolicyIssue(str(path), "-", f"not UTF-8: {exc}"))
    return None


def _missing_hint(path: Path) -> str:
    """How to name the main file; "set $MAILGATE_CONFIG" would mislead when it is set."""
    env = os.environ.get(CONFIG_ENV)
    if env and Path(env) == path:
        return f" (the path ${CONFIG_ENV} names)"
    return f" (give --config FILE or set ${CONFIG_ENV})"


def merge_into(
    base: dict[str, Any],
    override: Mapping[str, Any],
    origin: str,
    origins: dict[str, str],
    prefix: str = "",
) -> None:
    """Lay ``override`` over ``base``: tables merge key by key, everything else replaces.

    ``origins`` records, per dotted key (tables included), the file that last set it.
    """
    for name, value in override.items():
        key = f"{prefix}.{name}" if prefix else name
        origins[key] = origin
        current = base.get(name)
        if isinstance(value, dict) and isinstance(current, dict):
            merge_into(current, value, origin, origins, key)
        else:
            if isinstance(current, dict):
                _forget(origins, key)
            base[name] = _copy(value)
            if isinstance(value, dict):
                _record(value, origin, origins, key)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _record(table: Mapping[str, Any], origin: str, origins: dict[str, str], prefix: str) -> None:
    for name, value in table.items():
        key = f"{prefix}.{name}"
        origins[key] = origin
        if isinstance(value, dict):
            _record(value, origin, origins, key)


def _forget(origins: dict[str, str], prefix: str) -> None:
    for key in [k for k in origins if k.startswith(prefix + ".")]:
        del origins[key]


def origin_of(key: str, origins: Mapping[str, str], fallback: str = "-") -> str:
    """The file that set ``key`` or, failing that, its closest enclosing table."""
    while key:
        if key in origins:
            return origins[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return origins.get("", fallback)


def build_policy(
    data: Mapping[str, Any],
    origins: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Policy:
    """Validate merged TOML data; ``origins`` maps dotted keys to files (``""``: the fallback).

    ``base_dir`` (the main policy file's directory) anchors relative list file paths.
    """
    origins = origins or {}
    policy, problems = policy_from_dict(data)
    issues = [PolicyIssue(origin_of(key, origins), key, message) for key, message in problems]
    if policy is not None:
        if base_dir is not None:
            policy = _resolve_list_paths(policy, base_dir)
        issues.extend(_file_issues(policy, origins))
    if issues or policy is None:
        raise PolicyError(issues)
    return policy


def _file_issues(policy: Policy, origins: Mapping[str, str]) -> list[PolicyIssue]:
    """Files the policy names must be readable now, not at the first STARTTLS."""
    issues = []
    tls = policy.server.tls
    for name, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        if not path:
            continue
        key = f"server.tls.{name}"
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            message = f"cannot read {path}: {exc.strerror or exc}"
            issues.append(PolicyIssue(origin_of(key, origins), key, message))
    issues.extend(_list_issues(policy, origins))
    return issues


def _resolve_list_paths(policy: Policy, base_dir: Path) -> Policy:
    """Relative ``[lists]`` paths made absolute against the main policy file's directory.

    Where the list sits next to the policy is the only reading that does not change
    with the daemon's working directory; the policy keeps the absolute path, so
    ``policy show`` and the logs name the file actually read.
    """
    lists = policy.lists
    changes: dict[str, Any] = {
        name: str(base_dir.absolute() / path)
        for name, path in lists.files()
        if not Path(path).is_absolute()
    }
    if not changes:
        return policy
    return dataclasses.replace(policy, lists=dataclasses.replace(lists, **changes))


def _list_issues(policy: Policy, origins: Mapping[str, str]) -> list[PolicyIssue]:
    """Every list file must read and parse now: a reload with a bad line is refused.

    Parsing here also fills the list cache, so building the checks right after
    re-reads nothing.
    """
    if not policy.lists.enabled:
        return []
    # Here, not at the top: a policy without lists (and `--help`) need not import them.
    from filter.lists import ListFileError, load_list

    issues = []
    for name, path in policy.lists.files():
        key = f"lists.{name}"
        origin = origin_of(key, origins)
        try:
            load_list(name, path)
        except OSError as exc:
            issues.append(PolicyIssue(origin, key, f"cannot read {path}: {exc.strerror or exc}"))
        except ListFileError as exc:
            issues.extend(PolicyIssue(origin, key, message) for message in exc.messages())
    return issues


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read ``path`` and its ``local.d`` drop-ins; ``PolicyError`` lists every problem."""
    main = Path(path)
    issues: list[PolicyIssue] = []
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {"": str(main)}
    files = [main, *dropin_files(main, issues)]
    for file in files:
        data = _read_toml(file, issues, main=file is main)
        if data is not None:
            try:
                merge_into(merged, data, str(file), origins)
            except RecursionError:  # merging recurses per nested table
                issues.append(PolicyIssue(str(file), "-", _TOO_DEEP))
    if issues:
        raise PolicyError(issues)
    policy = build_policy(merged, origins, main.parent)
    return LoadedPolicy(policy, tuple(files), merged)
