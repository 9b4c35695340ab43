import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
QWEN2_TOKENIZER_DIR = os.path.join(SHARED, "assets", "qwen2-tokenizer")
VISA_SPLIT_CSV = os.path.join(SHARED, "data", "visa", "split_csv", "1cls.csv")
REF_PYTHON = os.environ.get("PPIAD_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))


def require_shared(path: str) -> str:
    """Skip (with the reason) when ../shared is absent, as in a user's clone."""
    if not os.path.exists(path):
        pytest.skip(f"needs {path} from ../shared beside the repository (absent in a user's clone)")
    return path


def require_ref_python() -> str:
    """Skip when the torch + transformers 4.51.3 reference virtualenv is absent."""
    if not os.path.exists(REF_PYTHON):
        pytest.skip(f"reference virtualenv not found at {REF_PYTHON} (`make venv-ref` creates it)")
    return REF_PYTHON


def load_tool(name: str):
    """The module behind tools/<name>.py and `ppiad <name>`: ppiad.cli.<name> (tools/*.py only wrap its main)."""
    import importlib

    return importlib.import_module(f"ppiad.cli.{name}")
