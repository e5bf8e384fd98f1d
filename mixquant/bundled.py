"""Data files that ship inside the package."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CALIBRATION_MIX = DATA / "calibration.jsonl"  # written for this project: chat, tool calls, code, prose, Chinese
EVAL_TEXT = DATA / "eval_heldout.txt"  # held-out text no calibration step ever sees
