"""The ``dareflow`` command: one module per subcommand, each with ``add_parser`` and ``run``.

Subcommand modules import the flows they run inside ``run``: ``dareflow ls`` or
``dareflow validate`` then answers without importing torch and Prefect. A command that
runs flows prints progress and one ``error:`` line, with the full log (tracebacks) in a
file (``dareflow.cli.logs``; ``dareflow --debug`` prints the tracebacks too), and its
temporary Prefect server exits with it (``dareflow.flows.runtime``).
"""

import argparse
import contextlib
import gc
import sys
import traceback
from collections.abc import Sequence

from dareflow.cli import (
    demo,
    evaluate,
    experiments,
    inspect_deltas,
    logs,
    ls,
    merge,
    mirror,
    plan,
    validate,
)

#: Subcommand modules in the order ``dareflow --help`` lists them.
COMMANDS = (merge, plan, validate, evaluate, mirror, ls, demo, inspect_deltas, experiments)
#: What a user's mistake or the environment raises: printed as one ``error:`` line, exit
#: code 2. OSError: storage errors name the file or URI, what failed and what to do (a full
#: or read-only output or store, an unreachable endpoint; ``dareflow.io.retry``).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError,
                   OSError)
#: Subcommand modules whose commands run Prefect flows.
FLOW_COMMANDS = (merge, evaluate, demo, experiments, inspect_deltas)
DEBUG_HELP = "print full tracebacks (Prefect's and the error's) instead of one error: line"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dareflow",
        description="Merge homologous fine-tuned LMs with DARE (drop and rescale) on Prefect.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for p in sub.choices.values():  # also after the subcommand: dareflow merge --debug ...
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_workers", None) is not None and args.max_workers < 1:
        print(f"error: --max-workers must be >= 1, got {args.max_workers}", file=sys.stderr)
        return 2
    if args.func.__module__ not in {m.__name__ for m in FLOW_COMMANDS}:
        return _run(args, None)
    # without a Prefect API: the temporary Prefect server starts now, while the command
    # imports (it exits with this process; flows wait for it where they start)
    from dareflow.flows.runtime import start_temporary_server

    start_temporary_server()
    with logs.session(args.command, debug=args.debug) as log_file:
        return _run(args, log_file)


def _run(args: argparse.Namespace, log_file) -> int:
    """Run the subcommand; an error becomes one ``error:`` line (exit 2; an unexpected
    exception of a command that runs flows: exit 1), followed by the log file's path."""
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        return _report(args, log_file, str(message), 2, e)
    except Exception as e:
        if log_file is None:
            raise  # outside flows Python's own report is the clearest
        return _report(args, log_file, f"unexpected {type(e).__name__}: {e}", 1, e)


def _report(args: argparse.Namespace, log_file, message: str, code: int,
            exc: BaseException) -> int:
    if log_file is not None:
        logs.log_failure(f"dareflow {args.command} failed: {message}", exc)
    if args.debug:
        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr)
    with contextlib.suppress(OSError):
        if log_file is not None and log_file.exists():
            print(f"(full log with tracebacks: {log_file}; or rerun with dareflow --debug)",
                  file=sys.stderr)
    return code


def run() -> None:
    """The ``dareflow`` command: :func:`main`, then a fast exit.

    ``gc.freeze()`` once the work is done: the interpreter's final collection then
    skips the ~1M objects torch and Prefect create, which saves ~0.5 s per command
    (measured: exit 0.6 s -> 0.1 s with both imported). Exit handlers (Prefect's log
    and event flushes) still run.
    """
    code = main()
    gc.freeze()
    sys.exit(code)

