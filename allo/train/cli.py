"""``allo-train [STAGE] [--flags] [--config FILE.yaml]``: the command line, generated from TrainConfig.

With no arguments it runs every stage on the built-in task. Precedence: flags > YAML > defaults.
Multi-process: ``accelerate launch [--num_processes N] -m allo.train.cli run ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing

from .config import STAGES, TrainConfig

COMMANDS = ("run",) + STAGES


def _bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing})  # annotations are strings (from __future__ import annotations)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


# other spellings users know a flag by (TRL's older name)
_ALIASES = {"dtype": ("--torch_dtype",)}


class _Parser(argparse.ArgumentParser):
    """An error is one line of usage hint and the error itself (not ~60 lines of usage first)."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [COMMAND] [--option VALUE ...]; run `{self.prog} --help` for the "
                     f"commands and options\n{self.prog}: error: {message}\n")


def _help(text: str, default) -> str:
    """The field's help, with its default appended unless the text already gives it ("(default ...")
    or it is None (which says nothing: the text tells what happens without the option)."""
    if default is None or re.search(r"\(default", text, re.IGNORECASE):
        return text
    return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="allo-train",
        usage="allo-train [COMMAND] [--option VALUE ...] [--config FILE.yaml]",
        description="ALLO alignment: warm-up DPO, key-neuron selection, token-level forgetting, key-token DPO. "
                    "Every stage writes to --output_dir/<stage>/ and is skipped by `run` once complete (unless an "
                    "earlier stage completed after it). COMMAND (default: run) is `run` (every stage of --stages in "
                    "order, skipping completed ones) or one stage: " + ", ".join(STAGES) + ".",
        formatter_class=argparse.HelpFormatter)
    # COMMAND is not an argparse positional: an unknown flag's value (`--eval_steps 10`) would be taken for
    # it ("invalid choice: '10'"); parse() picks it out of what the options left
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are these flag names (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        tp = _base_type(f.type)
        kw = {"help": _help(f.metadata["help"], f.default), "default": f.default}
        if tp is bool:
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw.update(type=tp)
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name}", *_ALIASES.get(f.name, ()), **kw)
    return p


def _command(parser, extras: list[str]) -> str:
    """The COMMAND among what the options left (``extras``, in order): a bare word that is not the
    value of an unknown flag; anything else left is an unrecognized argument, named as given."""
    command, rest = None, []
    for i, tok in enumerate(extras):
        after_unknown_flag = i > 0 and extras[i - 1].startswith("-") and "=" not in extras[i - 1]
        if command is None and tok in COMMANDS and not after_unknown_flag:
            command = tok
        else:
            rest.append(tok)
    if rest:
        bare = [t for t in rest if not t.startswith("-")]
        if command is None and bare and not any(t.startswith("-") for t in rest):
            parser.error(f"invalid command {bare[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return command or "run"


_EXPECTED = {bool: "true or false", int: "an int", float: "a float", str: "a string"}


def _yaml_value(parser, path: str, f: dataclasses.Field, value):
    """A YAML ``--config`` value as its flag would give it, or a parser error naming the file and key.
    argparse converts only string defaults, and without saying where they came from: a list, or 2.5
    for an int, would reach the training loop as it is."""
    tp = _base_type(f.type)
    if value is None and f.default is None:
        return None
    try:
        if isinstance(value, str):
            return _bool(value) if tp is bool else tp(value)
        if tp is str and isinstance(value, (bool, int, float)):
            return str(value).lower() if isinstance(value, bool) else str(value)  # e.g. resume_from_checkpoint: true
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
    except (ValueError, argparse.ArgumentTypeError):
        pass
    parser.error(f"{path}: key '{f.name}': expected {_EXPECTED.get(tp, tp.__name__)}, got {value!r}")


def _bare_bools_before_commands(parser, argv: list[str]) -> list[str]:
    """``--bf16 warmup`` read as ``--bf16=true warmup``: a boolean flag takes an optional value, so
    argparse would take the COMMAND (which may come anywhere) for it and refuse it as no boolean."""
    out = list(argv)
    for i, tok in enumerate(out[:-1]):
        if not tok.startswith("--") or "=" in tok or out[i + 1] not in COMMANDS:
            continue
        # the flag as argparse would match it: exactly, else as the unique prefix of one option
        action = parser._option_string_actions.get(tok)
        if action is None:
            matches = {a for s, a in parser._option_string_actions.items() if s.startswith(tok)}
            action = matches.pop() if len(matches) == 1 else None
        if action is not None and action.type is _bool:
            out[i] = f"{tok}=true"
    return out


def parse(argv=None) -> tuple[str, TrainConfig]:
    parser = build_parser()
    argv = _bare_bools_before_commands(parser, sys.argv[1:] if argv is None else list(argv))
    args, extras = parser.parse_known_args(argv)
    command = _command(parser, extras)
    if args.config:
        import yaml

        try:
            with open(args.config) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as e:
            parser.error(f"--config {args.config}: {e.strerror}")
        except yaml.YAMLError as e:
            parser.error(f"--config {args.config}: not valid YAML ({e})")
        if not isinstance(data, dict):
            parser.error(f"{args.config}: expected a mapping of flag names to values")
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            parser.error(f"{args.config}: unknown key(s) {unknown}; keys are the flag names of `allo-train --help`")
        parser.set_defaults(**{k: _yaml_value(parser, args.config, fields[k], v) for k, v in data.items()})
        args, _ = parser.parse_known_args(argv)  # flags given on the command line still win
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**values).validate()
    except ValueError as e:
        parser.error(str(e))
    return command, cfg


def main(argv=None) -> int:
    command, cfg = parse(argv)
    from . import pipeline
    from .config import RunError
    from .data import DataError

    try:
        if command == "run":
            pipeline.run(cfg)
        else:
            pipeline.run_stage(command, cfg)
    except (DataError, RunError, FileNotFoundError) as e:
        # the user's input is at fault and the message says how to fix it: no traceback
        print(f"allo-train: error: {e}", file=sys.stderr)
        return 2
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Several processes: every rank waits for the others, then the process group is torn down. Left to
    the interpreter's exit, a rank could tear down its gloo group while another's traffic was still in
    flight, and that rank aborted ("terminate called without an active exception", exit code -6) after
    a successful run (seen in CI, 2026-11-27)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
