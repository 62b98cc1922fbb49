"""Scripts run as ``python bench/x.py`` put their folder first on sys.path, so a script named like an
installed module (transformers imports ``kernels`` when that distribution is installed) would
replace it for every library the script imports."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("bench", "examples") for p in (ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_name_does_not_shadow_an_installed_module(script):
    spec = importlib.util.find_spec(script.stem)
    assert spec is None or Path(spec.origin or "").resolve() == script.resolve(), \
        f"{script.relative_to(ROOT)} shadows the installed module {script.stem!r} ({spec.origin})"
