"""What each check costs in place: bench.py once per configuration, one table.

Run by ``make bench-checks``. For ``--checks all`` (and ``none``, the empty
pipeline) it runs ``bench.py`` again with each check left out (``--without``),
and prints mailgate's CPU per message and the proxy/direct ratio of every run.
The price of a check is the CPU per message with every check on (the mean of a
run first and a run last) minus the CPU with all but that one: pipeline, headers,
log fields and store calls included. Differences below about 0.05 ms are within
the run-to-run noise on a shared 2-core machine; repeat with ``--rounds 3``
before believing a small one.

Not a test: it asserts nothing and is never collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKS = ("spf", "dkim", "dmarc", "arc", "dnsbl", "greylist", "rdns", "helo")


def run_bench(checks: str, without: str, a: argparse.Namespace) -> dict[str, Any] | None:
    """One bench.py run; its scenario summary (the JSON line), or None if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        argv = [sys.executable, str(HERE / "bench.py"), "--checks", checks]
        argv += ["--sessions", str(a.sessions), "--rounds", str(a.rounds)]
        argv += ["--duration", str(a.duration), "--workers", str(a.workers)]
        argv += ["--json-out", out.name]
        if without:
            argv += ["--without", without]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        lines = [json.loads(x) for x in Path(out.name).read_text().splitlines() if x.strip()]
    summaries = [x for x in lines if x.get("type") == "scenario"]
    if done.returncode != 0 or not summaries:
        print(f"# bench.py --checks {checks} --without {without or '-'} failed:", file=sys.stderr)
        print(done.stdout[-2000:] + done.stderr[-2000:], file=sys.stderr)
        return None
    last: dict[str, Any] = summaries[-1]
    return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    runs: list[tuple[str, str, dict[str, Any] | None]] = [
        ("none", "", run_bench("none", "", a)),
        ("all", "", run_bench("all", "", a)),
    ]
    runs += [("all", c, run_bench("all", c, a)) for c in CHECKS]
    runs.append(("all", "rdns,helo", run_bench("all", "rdns,helo", a)))
    # The full pipeline again at the end: one run of it is the baseline of every
    # price, so its noise would shift them all; the mean of two bracketing runs less.
    runs.append(("all", "", run_bench("all", "", a)))
    fulls = [s["mailgate_cpu_ms_per_msg"] for c, w, s in runs if c == "all" and not w and s]
    full_cpu = sum(fulls) / len(fulls) if fulls else None
    none_ratio = runs[0][2]["ratio_median"] if runs[0][2] else None
    print(f"# {a.sessions} sessions x 10 msgs/conn, {a.rounds} round(s) of {a.duration:g} s")
    if full_cpu is not None:
        print(f"# price = mean CPU of the two 'all' runs ({full_cpu:.3f} ms) - CPU without it")
    print(f"{'configuration':32} {'ratio':>6} {'of none':>8} {'cpu ms/msg':>11} {'price ms':>9}")
    for checks, without, s in runs:
        name = checks + (f" without {without}" if without else "")
        if s is None:
            print(f"{name:32} {'failed':>6}")
            continue
        cpu, ratio = s["mailgate_cpu_ms_per_msg"], s["ratio_median"]
        of_none = f"{ratio / none_ratio:.0%}" if ratio and none_ratio else "-"
        price = "-"
        if without and "," not in without and cpu is not None and full_cpu is not None:
            price = f"{full_cpu - cpu:.3f}"
        cpu_text = f"{cpu:.3f}" if cpu is not None else "-"
        ratio_text = f"{ratio:.3f}" if ratio is not None else "-"
        print(f"{name:32} {ratio_text:>6} {of_none:>8} {cpu_text:>11} {price:>9}")
    return 0 if all(s is not None for _, _, s in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
