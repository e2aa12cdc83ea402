"""Command-line plumbing shared by every entry point: bad input is one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

from defense.errors import ConfigError, one_line, shown
from defense.fields import MAX_SEED

EXIT_USAGE = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each flag's true default said once: added as "(default: X)" unless the help text
    already says its default, or there is none to say (None, off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" in text or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or (isinstance(default, list) and not default)
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def module_prog() -> str:
    """How the running script is invoked: `python -m package.module` for a module of this project's
    packages (argparse's default is the file name), `python path/to/script.py` for a script."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = Path(__file__).resolve().parents[1]
    if script is None or script.suffix != ".py" or root not in script.parents:
        return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    relative = script.relative_to(root)
    folders = [root.joinpath(*relative.parts[:i]) for i in range(1, len(relative.parts))]
    if not all((folder / "__init__.py").exists() for folder in folders):
        return f"python {relative.as_posix()}"
    parts = relative.with_suffix("").parts
    return "python -m " + ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line (no usage block) and exits 2; its usage line
    reads `python -m MODULE` and --help says every flag's default once (HelpFormatter)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if not args and "prog" not in kwargs:
            kwargs["prog"] = module_prog()
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def field_pairs(words: Sequence[str], flag: str) -> dict[str, str]:
    """FIELD=VALUE words (e.g. `--set lam=0.5 epochs=10`) as a dict, later words winning; a word
    without '=' is a ConfigError naming `flag`."""
    pairs: dict[str, str] = {}
    for word in words:
        if "=" not in word:
            raise ConfigError(f"{flag} expects FIELD=VALUE, got {shown(word)}")
        key, value = word.split("=", 1)
        pairs[key] = value
    return pairs


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse



def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {value}")
    return value


SYSTEM_TREES = ("/proc", "/sys", "/dev")
WRITABLE_UNDER_SYSTEM_TREES = ("/dev/shm",)   # a tmpfs for files, not a device tree
MAX_NAME_BYTES = 240


def writable_destination(path: str | Path, flag: str = "--out") -> Path:
    """`path` (to be created) checked before any work: not inside /proc, /sys or /dev (/dev/shm is
    allowed), no name in it longer than the file system takes, and its
    nearest existing ancestor a folder this process can really write in (tried with a temporary
    file: root passes every permission check). Returns the absolute path."""
    target = Path(path).expanduser().absolute()
    too_long = next((part for part in target.parts if len(part.encode()) > MAX_NAME_BYTES), None)
    if too_long is not None:
        raise ConfigError(f"{flag}: the name {shown(too_long, 40)} is longer than {MAX_NAME_BYTES} bytes (file "
                          "systems take 255, and the atomic writer's temporary name adds 15)")
    resolved = target.resolve()
    inside = lambda tree: resolved == Path(tree) or Path(tree) in resolved.parents
    if any(map(inside, SYSTEM_TREES)) and not any(map(inside, WRITABLE_UNDER_SYSTEM_TREES)):
        raise ConfigError(f"{flag} {path}: not inside a system folder ({', '.join(SYSTEM_TREES)})")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {ancestor} ({exc.strerror or type(exc).__name__})") from None
    return target


def finite_json(value):
    """`value` with every non-finite float replaced by None: a JSON line never carries NaN or Infinity
    (which strict JSON readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_line(value) -> str:
    import json

    return json.dumps(finite_json(value), allow_nan=False)


def run_main(main: Callable[[Optional[Sequence[str]]], int], prog: str,
             argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run `main`; a ConfigError (bad value, bad file) becomes one stderr line and exit code 2; an
    OSError of the machine (disk full, a folder removed under the run) one line and exit code 1."""
    try:
        code = main(argv)
    except ConfigError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        code = EXIT_USAGE
    except OSError as exc:
        where = f" ({shown(str(exc.filename), 120)})" if exc.filename else ""
        print(f"{prog}: error: {one_line(exc.strerror or str(exc) or type(exc).__name__)}{where}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def add_trigger_arguments(parser: argparse.ArgumentParser, attack_default: str = "badnets",
                          from_record: bool = False) -> None:
    """--attack, --trigger-size, --target, --blend-alpha. With `from_record`, they default to None:
    the model file's experiment record decides and a flag given overrides it."""
    from defense.triggers import ATTACKS, PATTERNS, PLACES

    def default(value):
        return None if from_record else value

    note = " (default: the model file's experiment record)" if from_record else ""
    parser.add_argument("--attack", default=default(attack_default), choices=ATTACKS.names(), help="trigger kind" + note)
    parser.add_argument("--trigger-size", type=positive_int, default=default(3), help="patch trigger side (1..7)" + note)
    parser.add_argument("--target", type=non_negative_int, default=default(0), help="all-to-one target class" + note)
    parser.add_argument("--blend-alpha", type=float, default=default(0.2), help="blended trigger opacity" + note)
    parser.add_argument("--trigger-place", default=default(PLACES[0]), choices=PLACES,
                        help="where patch triggers go (random: a random place per sample)" + note)
    parser.add_argument("--trigger-pattern", default=default(PATTERNS[0]), choices=PATTERNS,
                        help="patch trigger pattern: checkerboard (the DHBE code's tri2), tri1 (its inverse, the DHBE "
                             "code's default) or white (BackdoorBench's square)" + note)
