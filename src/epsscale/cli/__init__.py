"""``epsscale``: the command line, thin wrappers over the library (one module a subcommand).

    epsscale demo        baseline vs Epsilon Scaling on the shipped model (or --toy)
    epsscale sample      sample seeds to an ADM-style .npz (and a PNG grid)
    epsscale measure     exposure bias: delta_t and eps-norm curves, baseline vs ES
    epsscale calibrate   choose lambda: an FID search or norm matching
    epsscale fid         FID of samples against reference statistics
    epsscale train       train (or resume) the Fashion-MNIST model

Bad input ends with one line on stderr, ``epsscale <command>: error: <message>``, and exit
status 2 (3 when the network returns NaN or inf, 130 on Ctrl-C); nothing half-written is left
behind. The library never imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from . import common, demo, exposure, fid, sample, train
from .common import SAMPLER_NAMES, Parser, UserError

__all__ = ["main", "build_parser", "SAMPLER_NAMES", "UserError"]


def build_parser() -> Parser:
    p = Parser(prog="epsscale", description="Measure and correct exposure bias in diffusion models with Epsilon Scaling (Ning et al., ICLR 2024).")
    p.add_argument("--version", action="version", version=f"epsscale {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    demo.add_parser(sub)
    sample.add_parser(sub)
    exposure.add_parsers(sub)
    fid.add_parser(sub)
    train.add_parser(sub)
    return p


def _version() -> str:
    from .. import __version__

    return __version__


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{common._CURRENT[0]}: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
    return f"{common._CURRENT[0]}: warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``epsscale`` command; returns the exit status (0; 2 bad input; 3 non-finite output; 130 Ctrl-C)."""
    import warnings

    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # a warning is one line too, without file and source
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    handler.setLevel(logging.WARNING)
    log = logging.getLogger("epsscale")
    log.addHandler(handler)
    log.propagate = False
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = shown
        log.removeHandler(handler)
        common.set_current_command("epsscale")


def _command_from(argv: Sequence[str]) -> str:
    """The subcommand named in argv (for error lines written before parsing finishes)."""
    commands = ("demo", "sample", "measure", "calibrate", "fid", "train")
    for a in argv:
        if a in commands:
            return f"epsscale {a}"
        if not a.startswith("-"):
            break
    return "epsscale"


def _with_hint(parser: Parser, argv: list[str], message: str) -> str:
    """An unknown option, with the command's options that it most likely meant (``--seed`` -> ``--seeds``)."""
    import difflib

    if not message.startswith("unrecognized arguments:"):
        return message
    command = _command_from(argv).removeprefix("epsscale").strip()
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    target = sub.choices.get(command, parser) if sub is not None else parser
    options = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for token in message.split(":", 1)[1].split():
        if token.startswith("--"):
            close = difflib.get_close_matches(token.split("=")[0], options, n=1, cutoff=0.6)
            if close:
                hints.append(f"{token}: did you mean {' or '.join(close)}?")
    return message + (f" ({'; '.join(hints)})" if hints else "")


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common.set_current_command(_command_from(argv))
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except UserError as e:
            raise UserError(_with_hint(parser, argv, str(e))) from None
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except (UserError, ValueError, OSError, ImportError) as e:
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        print(f"{common._CURRENT[0]}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{common._CURRENT[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # NonFiniteError: one line, status 3
        from ..sampling import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"{common._CURRENT[0]}: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
