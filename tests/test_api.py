"""The public API: every name resolves, `import surgery` stays cheap, and docs/api.md's example runs."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import surgery
from tests.conftest import REPO


def test_every_public_name_resolves_and_documents_itself():
    assert set(surgery.__all__) == {"__version__", *surgery._EXPORTS}
    for name in surgery.__all__:
        value = getattr(surgery, name)
        if callable(value) and not inspect.isclass(value):
            doc = inspect.getdoc(value) or ""
            assert "Args" in doc or "Returns" in doc, f"surgery.{name} does not say what it takes and returns"


def test_import_surgery_loads_no_heavy_library():
    heavy = {"torch", "transformers", "rich", "pydantic", "numpy"}
    script = f"import sys, surgery; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_worked_example_runs_as_written(tmp_path):
    example = re.search(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)[1]
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "6 layers" in result.stdout and "[0, 1, 2, 3, 4, 7]" in result.stdout
    assert "builtin:mixed-heldout" in result.stdout and "perplexity on code" in result.stdout
    assert (tmp_path / "out" / "drop" / "surgery.json").is_file()
