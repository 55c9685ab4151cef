"""Each command's ``--help``: its docstring as paragraphs, then copy-paste examples on the bundled models.

Run from the repository root; each line works as written, in order (later examples read the
files earlier ones write). ``tests/test_cli_polish.py`` runs them.
"""

from __future__ import annotations

import inspect

import typer

# Each line fits an 80-column terminal, so rich's help never wraps one.
EXAMPLES: dict[str, list[str]] = {
    "analyze": [
        "a2q analyze models/fmnist_cnn_w4a4.onnx --per-channel --plot widths.png",
        "a2q analyze models/digits_cnn_qdq.onnx --json",
    ],
    "annotate": [
        "a2q annotate models/digits_cnn_w4a4.onnx digits_annotated.onnx",
    ],
    "project": [
        "a2q project models/digits_cnn_w4a4.onnx digits_p13.onnx --acc-bits 13",
        "a2q project models/digits_cnn_w4a4.onnx mixed.onnx --layer Gemm_0=10",
    ],
    "verify": [
        "a2q verify digits_p13.onnx",
        "python scripts/demo_data.py npz digits 300 digits_test.npz",
        "a2q verify models/digits_cnn_w4a4.onnx --acc-bits 15 --data digits_test.npz",
    ],
    "finetune": [
        "python scripts/demo_data.py npz digits 600 t.npz train",
        "a2q finetune models/digits_cnn_w4a4.onnx q12.onnx --acc-bits 12 --data t.npz",
    ],
    "allocate": [
        "a2q allocate digits_p13.onnx --data t.npz --min-score-pct 99 -o w.json",
        "a2q project digits_p13.onnx digits_mixed.onnx --widths-json w.json",
    ],
    "lower": [
        "a2q lower digits_p13.onnx digits_hw.onnx --from-annotations",
    ],
    "report": [
        "a2q report digits_hw.onnx --fpgapart xczu3eg-sbva484-1-e",
    ],
}


def help_paragraphs(text: str) -> str:
    """``text`` (a docstring) with the line breaks inside each paragraph joined: typer's help keeps every line break
    and wraps each line to the terminal again, which leaves ragged half-lines where the source wrapped."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


def finish_help(app: typer.Typer) -> None:
    """Give each command its docstring as paragraphs and append its examples to the end of its ``--help``."""
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        info.help = help_paragraphs(info.callback.__doc__ or "")
        lines = EXAMPLES.get(name, [])
        if lines:
            info.epilog = "Examples (from the repository root):\n\n" + "\n\n".join(f"$ {line}" for line in lines)
