"""``tlora-diffusers``: argparse wiring, one module per command, and the error manners.

A user error (a missing file, a file of the wrong format, an invalid config value: the
``ValueError``/``OSError``/``TypeError`` the library raises, the commands' own ``CLIError``,
or ``ImportError`` for a missing optional package) is printed as one line,
``tlora-diffusers: error: ...``, with exit status 2; ``--verbose`` adds the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from .. import __version__
from . import convert, demo, generate, schedule, train
from . import inspect as inspect_command

__all__ = ["main", "build_parser", "PROG", "COMMANDS"]

PROG = "tlora-diffusers"
#: Each command module has ``add_parser(subparsers, parents)``, which sets ``run(args) -> int``.
COMMANDS = (demo, train, generate, schedule, inspect_command, convert)
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)  # CLIError is a ValueError

EPILOG = """\
examples:
  tlora-diffusers demo
  tlora-diffusers train --model ./sdxl --images ./dog --prompt "a photo of sks dog" --out out/
  tlora-diffusers schedule --max-rank 64 --alpha 1 --alpha 2 --steps 25 --plot schedule.png
  tlora-diffusers generate --model ./sdxl --lora out/ --prompt "a sks dog" --no-mask
  tlora-diffusers inspect out/pytorch_lora_weights.safetensors
  tlora-diffusers convert lycoris.safetensors converted/ --model ./sdxl

Run `tlora-diffusers COMMAND --help` for each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="T-LoRA (timestep-dependent LoRA rank masking) on stock diffusers pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and library logs")
    # Repeated on every command (so it may follow the command); SUPPRESS keeps the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers, [common])
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
