"""deepvrm-lens: the command line of Deep-VRM Lens.

Each sub-command does one step of the analysis, prints a JSON summary of its run on stdout, and (with
``--out``) writes it beside its outputs. Steps whose outputs exist are reused, so a second run is fast.

    python analysis.py all                      # the main job on the embedded default
    python analysis.py data --preset default    # build forensic-mini
    python analysis.py backbone                 # pretrain mini-VL on its semantic questions
    python analysis.py capture --model mini-vl  # per-layer activations into the cache

Run ``python analysis.py COMMAND --help`` for what each command does and what it needs.
"""

from __future__ import annotations

import os


def _openmp_wait_policy() -> None:
    """On a CPU already busy with other jobs, let idle OpenMP threads sleep instead of spinning: spinning
    made torch 3-7x slower there, while on a machine with cores to spare spinning is 2x faster (both
    measured on 2 cores). Must run before torch is imported; an explicit OMP_WAIT_POLICY is kept."""
    busy = os.getloadavg()[0] > (os.cpu_count() or 1) + 1  # more runnable jobs than cores
    if busy:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_openmp_wait_policy()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from injection import cli as injection_cli  # noqa: E402
from injection.inspect import cli as inspect_cli  # noqa: E402
from probes import cli as probes_cli  # noqa: E402

COMMAND_GROUPS = [probes_cli, injection_cli, inspect_cli]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="deepvrm-lens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        for name, (add_arguments, run, help_text) in group.COMMANDS.items():
            p = sub.add_parser(
                name, help=help_text.splitlines()[0], description=help_text,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            add_arguments(p)
            p.set_defaults(run=run)
    return top


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    from probes.errors import LensError

    try:
        summary = args.run(args)
    except LensError as err:  # a user-facing problem: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
