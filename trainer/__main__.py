"""``lacot-train`` / ``python -m lacot_kernels.trainer``.

    lacot-train demo [--out DIR] [--fast] [section.key=value ...]
    lacot-train distill [CONFIG.yaml] [section.key=value ...]
    lacot-train {sft,dpo,grpo,lacot,bin} [CONFIG.yaml] [section.key=value ...]

Overrides may also be written ``--section.key=value``. Multi-process: ``torchrun --nproc_per_node=K -m
lacot_kernels.trainer ALGORITHM CONFIG.yaml``.
"""

from __future__ import annotations

import os
import sys

from .config import ALGORITHMS


def _usage() -> str:
    return (__doc__ or "").strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    # Nothing is ever fetched from a hub by this program; keep the libraries from trying.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    if command == "demo":
        from .demo.pipeline import main as demo_main

        return demo_main(rest)
    if command == "distill":
        from .distill import main as distill_main

        return distill_main(rest)
    if command not in ALGORITHMS:
        print(
            f"unknown command {command!r}: expected demo, distill or one of {', '.join(ALGORITHMS)}\n\n{_usage()}",
            file=sys.stderr,
        )
        return 2
    from .config import load_config
    from .loop import run

    path = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if path else rest
    try:
        cfg = load_config(path, overrides + [f"train.algorithm={command}"])
    except (ValueError, FileNotFoundError) as exc:
        print(f"lacot-train: {exc}", file=sys.stderr)
        return 2
    result = run(cfg)
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
