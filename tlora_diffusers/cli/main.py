"""``tlora-diffusers``: argparse wiring, one module per command (imported only when it runs), error manners.

A user error (a missing file, a file of the wrong format, an invalid config value: the
``ValueError``/``OSError``/``TypeError`` the library raises, the commands' own ``CLIError``,
or ``ImportError`` for a missing optional package) is printed as one line,
``tlora-diffusers: error: ...``, with exit status 2; ``--verbose`` adds the traceback.
A closed output pipe (``... | head``) ends quietly with status 0. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from typing import Optional, Sequence

from .. import __version__

__all__ = ["main", "build_parser", "PROG", "COMMANDS"]

PROG = "tlora-diffusers"
#: name -> (module, one-line help). Each module has ``add_parser(subparsers, parents)``, which sets ``run``.
COMMANDS = {
    "demo": ("demo", "offline demo on the shipped scenes model: train LoRA and T-LoRA on one image, compare"),
    "train": ("train", "train a T-LoRA on one or a few images"),
    "generate": ("generate", "generate images with a T-LoRA on a local diffusers pipeline"),
    "schedule": ("schedule", "print (and plot) the active rank at each timestep and sampling step"),
    "inspect": ("inspect", "describe a T-LoRA file: format, schedule, rank, modules"),
    "convert": ("convert", "convert a T-LoRA file: to ours, to kohya, to the ComfyUI-T-LoRA layout, or to a static LoRA"),
}
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


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (``None``: every command, for tests and docs)."""
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
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"{__package__}.{module}").add_parser(subparsers, [common])
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    parser = build_parser(command if command in COMMANDS else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    from ._common import quiet_libraries

    saved = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        with quiet_libraries(args.verbose):
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error
        _silence_stdout()
        return 0
    except Exception as e:
        # safetensors' own error (a write that failed: disk full, too large) and PIL's decompression bomb are the
        # user's situation too; anything else is a bug and keeps its traceback
        if not isinstance(e, USER_ERRORS) and type(e).__name__ not in ("SafetensorError", "DecompressionBombError"):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = saved


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=file or sys.stderr)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:  # not "[Errno 2] ...: 'x'"
        path = str(error.filename)
        text = f"{path}: {error.strerror[:1].lower()}{error.strerror[1:]}"
        parent = os.path.dirname(os.path.abspath(path))
        if error.errno == 2 and not os.path.isdir(parent):
            text += f" (the folder {parent} does not exist)"
        elif error.errno == 20:  # ENOTDIR: some part of the path is a file
            part = os.path.abspath(path)
            while part != os.path.dirname(part) and not os.path.isfile(part):
                part = os.path.dirname(part)
            if os.path.isfile(part):
                text += f" ({part} is a file, not a folder)"
        return text
    if isinstance(error, OSError) and error.strerror and not error.filename:  # not "[Errno 28] No space ..."
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
