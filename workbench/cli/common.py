"""What every command shares: the model options, loading the model they name, the output
folder check, list options and the help format."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.engine.models import LoadedModel


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model folder, hub id or .gguf file")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template for a tokenizer that has none (many GGUF files)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads: auto (the fastest of 1, half, all cores, measured), "
        "default (torch's), or a count",
    )
    p.add_argument(
        "--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)"
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own code (off by default)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of every command that writes a resumable run folder."""
    p.add_argument("--overwrite", action="store_true", help="discard an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_out(args: argparse.Namespace, kind: str, study_name: str) -> None:
    """Refuse an --out folder holding another run before the model loads (seconds to minutes)."""
    from workbench.runs import check_out_dir

    expected = {"kind": kind, "study": study_name, "model": args.model}
    check_out_dir(args.out, expected, overwrite=getattr(args, "overwrite", False))


DATA_PARALLEL = (
    "distributions",
    "sample",
    "activations",
    "patch",
    "attribute",
    "steer",
    "mediate",
)
"""The commands that split their work over the ranks of a torchrun / accelerate launch."""


def is_main_rank() -> bool:
    """False on the ranks other than 0 of a data-parallel launch: they print no summary
    (rank 0 prints the one run they all wrote)."""
    from workbench import distributed

    return distributed.launched().is_main


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model named by the options `add_model_args` defines.

    Under a data-parallel launch: this rank's GPU group only (before CUDA starts), and on
    CPU an equal share of the cores per process of the node.
    """
    import os

    from workbench import distributed

    # Commands outside DATA_PARALLEL run `alone()` on rank 0 (cli.main), so they see no launch.
    ranks = distributed.launched()
    distributed.select_gpus()
    distributed.current()

    from workbench.engine.models import load_model, resolve_device
    from workbench.engine.threads import choose_threads

    device = resolve_device(args.device)
    if ranks.active and device.type == "cpu" and args.threads == "auto":
        args.threads = str(max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    threads = choose_threads(args.threads, device)
    lm = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template,
    )
    lm.source["torch_threads"] = threads
    return lm


def split_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has one (not for flags or required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and not action.required
            and default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """`--help` shows every option's default (nested subcommands too)."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)
