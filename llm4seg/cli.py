"""What the entry scripts (train.py, eval.py) share on the command line.

    one_line_error_parser(d)   argparse that shows defaults in --help and reports a bad flag in one
                               line ("error: ... (see --help)", exit 2), not a usage block
    defaults_of(function)      a function's defaults: flags read theirs from the signature they
                               configure, so each is written once (--layer from build_model's `layer=15`)
    add_runtime_flags(parser)  --device, --batch-size, --workers, --precision, the same in every script
    USER_ERRORS, user_error    what the user can fix is one "error: ..." line and exit code 2;
                               LLM4SEG_DEBUG=1 prints the traceback as well
    disk_error                 a files.WriteError (disk full, file too large) is one line and exit code 1
"""
import argparse
import inspect
import os
import sys
import traceback

from .runtime import PRECISIONS

# The exceptions that mean "fix your input", never a bug: printed as one line, no traceback
# (files.InputError, which every reader raises for a malformed file, is a ValueError).
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError)
DEBUG_ENV = "LLM4SEG_DEBUG"  # =1: a user error prints its traceback too
USER_ERROR_EXIT = 2
DISK_ERROR_EXIT = 1  # the run or the evaluation is sound, the disk is not


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(USER_ERROR_EXIT, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; the description and epilog (examples, tables) as written."""


def one_line_error_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return OneLineErrorParser(description=description, epilog=epilog, formatter_class=HelpFormatter)


def defaults_of(function) -> dict:
    """{parameter: default} of the parameters of `function` that have one."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


# The runtime flags' defaults, train.py's (run_config.RunConfig) and eval.py's alike.
RUNTIME_DEFAULTS = {"device": "auto", "workers": None, "precision": "auto"}


def add_runtime_flags(parser: argparse.ArgumentParser, batch_size: int = 8) -> None:
    parser.add_argument("--device", default=RUNTIME_DEFAULTS["device"], help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="images per forward pass, per process (metrics stay per image)")
    parser.add_argument("--workers", type=int, default=RUNTIME_DEFAULTS["workers"],
                        help="DataLoader worker processes; None means min(4, the CPU cores this process may use)")
    parser.add_argument("--precision", default=RUNTIME_DEFAULTS["precision"], choices=PRECISIONS,
                        help="compute dtype: auto = bf16 where the device has native bf16, else fp32")


def check_runtime_flags(args: argparse.Namespace) -> None:
    """The runtime flags' checks; --workers left None becomes min(4, the usable cores) here (more workers than
    cores only slow the step down, and torch warns about them every epoch)."""
    if args.workers is None:
        args.workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers: expected a number >= 0, got {args.workers}")


def user_error(error: Exception) -> int:
    """Print `error` as the one line a user reads (with its traceback under LLM4SEG_DEBUG=1), and return
    the exit code for it."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {error}", file=sys.stderr)
    return USER_ERROR_EXIT


def disk_error(error: OSError) -> int:
    """Print a files.WriteError as one line (its message names the file and what was kept) and return the exit
    code for it."""
    print(f"error: {error.strerror}", file=sys.stderr)
    return DISK_ERROR_EXIT
