"""``lacot-train`` / ``python -m lacot_kernels.trainer``: one command per algorithm, plus ``demo``.

    lacot-train demo [--out DIR] [--fast]                       # the embedded end-to-end job (offline)
    lacot-train {sft,dpo,grpo,lacot,bin,distill} [--config NAME|FILE] [section.key=value | --section.key VALUE ...]
    lacot-train CMD --help                                      # every option with its default and meaning
    torchrun --nproc_per_node=K -m lacot_kernels.trainer CMD --config FILE train.strategy=fsdp

Options are the fields of the config dataclasses (:mod:`.config`), parsed by tyro: the help text is the comment
next to each field there. A config is the defaults <- the YAML file (``--config``: a path or the name of a
packaged config) <- the command line. A new command is one :func:`register` call: a config dataclass and a
``run(cfg)`` function, both named by import path so nothing loads before it is needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

EXTRA_HINT = 'pip install "lacot-kernels[train]"'
CONFIG_HELP = "a YAML file, or the name of a packaged config (see above); read before the other options"
DEBUG_HELP = "print the full traceback of an error instead of one line"
PROG = "lacot-train"
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # section.key (or key, for a flat config)


@dataclass
class Command:
    help: str
    config: str  # "module:Class" of the config dataclass
    run: str  # "module:function" taking the config
    preset: dict[str, Any] = field(default_factory=dict)  # applied before the YAML file (e.g. train.algorithm)


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, config: str, run: str, preset: dict[str, Any] | None = None) -> None:
    COMMANDS[name] = Command(help, config, run, preset or {})


_ALGORITHM_HELP = {
    "sft": "supervised fine-tuning on rationale + answer",
    "dpo": "DPO on correct-vs-incorrect chains sampled from the starting model",
    "grpo": "GRPO: G chains per prompt, outcome rewards, clipped surrogate",
    "lacot": "LaCoT: RGFN exploration + interpolated sub-trajectory balance",
    "bin": "BiN evaluation (with greedy, majority, Best-of-N and pass@N on the same samples)",
}
for _name, _help in _ALGORITHM_HELP.items():
    register(
        _name,
        _help,
        "lacot_kernels.trainer.config:Config",
        "lacot_kernels.trainer.loop:run",
        {"train": {"algorithm": _name}},
    )
register(
    "distill",
    "a teacher writes rationales; the ones whose final answer matches become SFT data",
    "lacot_kernels.trainer.distill:DistillConfig",
    "lacot_kernels.trainer.distill:run_cli",
)


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    lines = [(__doc__ or "").strip().split("\n\n")[1], "", "commands:"]
    lines.append(f"  {'demo':<8} the embedded end-to-end job: tiny Qwen2-VL, SFT -> GRPO / LaCoT -> BiN (CPU)")
    lines += [f"  {name:<8} {c.help}" for name, c in COMMANDS.items()]
    lines += ["", f"packaged configs (--config NAME): {', '.join(packaged_configs())}", f"{PROG} --version"]
    return "\n".join(lines)


def packaged_configs() -> list[str]:
    from importlib import resources

    folder = resources.files("lacot_kernels.trainer") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name: str) -> str:
    """A YAML path as given, or the packaged config of that name (``grpo`` -> ``.../configs/grpo.yaml``)."""
    from importlib import resources

    if os.path.isfile(name):
        return name
    packaged = resources.files("lacot_kernels.trainer") / "configs" / f"{name.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return str(packaged)
    raise FileNotFoundError(
        f"config {name!r} is neither a file nor a packaged config (packaged: {', '.join(packaged_configs())})"
    )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lacot-kernels")
    except Exception:  # a source tree that was never installed
        return "unknown"


def _check_extra() -> str | None:
    """The first module of the ``train`` extra that is missing, or None."""
    for module in ("yaml", "tyro", "transformers", "tqdm", "PIL"):
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def _as_flags(args: list[str]) -> list[str]:
    """``section.key=value`` and ``--section.key=value`` (the YAML-style overrides) as tyro flags.

    The value is read as YAML only to spell lists (``[0.9, 0.95]`` -> two values) and booleans (``false`` ->
    ``False``) the way tyro takes them; anything else is passed on as written (so ``a: b`` stays a string).
    """
    import yaml

    out: list[str] = []
    for a in args:
        body = a[2:] if a.startswith("--") else a
        key, eq, raw = body.partition("=")
        if not eq or not KEY.fullmatch(key):
            out.append(a)
            continue
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, list):
            out += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, bool):
            out += [f"--{key}", str(value)]
        else:
            out.append(f"--{key}={raw}")
    return out


def parse(command: str, argv: list[str]) -> tuple[Any, bool]:
    """(config, debug) for ``command`` from its command line: defaults <- --config YAML <- options."""
    from typing import Annotated

    import tyro

    from .config import apply_mapping, read_yaml_file

    cmd = COMMANDS[command]
    cls = _load(cmd.config)
    # The YAML file comes first, whatever its position: it sets the defaults the options then override.
    config, rest, i = "", [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config, i = a.split("=", 1)[1], i + 1
            continue
        if i == 0 and not a.startswith("-") and "=" not in a:  # the older `lacot-train sft cfg.yaml ...`
            config, i = a, i + 1
            continue
        rest.append(a)
        i += 1
    cfg = cls()
    apply_mapping(cfg, cmd.preset, "command")
    if config:
        path = resolve_config(config)
        apply_mapping(cfg, read_yaml_file(path), path)
        apply_mapping(cfg, cmd.preset, "command")  # `lacot-train grpo --config sft` still runs grpo

    # The command's options: the config's fields without a prefix, and two of the command line's own. Built with
    # real type objects (not annotations as strings) because the config class is only known here.
    Cli = dataclasses.make_dataclass(
        "Cli",
        [
            ("cfg", Annotated[cls, tyro.conf.arg(name=""), tyro.conf.FlagConversionOff]),
            ("config", Annotated[str, tyro.conf.arg(help=CONFIG_HELP)], field(default="")),
            ("debug", Annotated[bool, tyro.conf.arg(help=DEBUG_HELP)], field(default=False)),
        ],
    )

    packaged = ", ".join(packaged_configs())
    description = (
        f"{PROG} {command}: {cmd.help}.\n\nDefaults <- --config (a YAML file or a packaged config: {packaged}) <- "
        "options, given as --section.key VALUE or section.key=VALUE."
    )
    parsed = tyro.cli(
        Cli,
        default=Cli(cfg=cfg, config=config),
        args=_as_flags(rest),
        prog=f"{PROG} {command}",
        description=description,
        use_underscores=True,
    )
    out = parsed.cfg
    if hasattr(out, "validate"):
        out = out.validate() or out
    return out, parsed.debug


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 600:
        text = text[:600] + " ..."
    kind = "" if isinstance(exc, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: "
    hint = ""
    if isinstance(exc, OSError) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        hint = " (HF_HUB_OFFLINE is set: a hub id cannot be downloaded, give a local checkpoint directory)"
    return f"{PROG}: error: {kind}{text}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(f"{PROG} (lacot-kernels) {_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command != "demo" and command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    missing = _check_extra()
    if missing:
        print(
            f"{PROG}: the trainer needs the `train` extra (module {missing!r} is missing): {EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2
    if command == "demo":
        # The demo builds everything in code: keep the libraries from trying the hub. Other commands may load
        # hub ids when online (set HF_HUB_OFFLINE=1 yourself to forbid it).
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
        from .demo.pipeline import main as demo_main

        return demo_main(rest)
    debug = "--debug" in rest
    try:
        cfg, debug = parse(command, rest)
        result = _load(COMMANDS[command].run)(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if debug:
            raise
        print(_one_line(exc) + " (run with --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(exc, (ValueError, FileNotFoundError)) else 1
    final = getattr(result, "final_dir", None)
    if final is not None:
        print(f"final model: {final}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
