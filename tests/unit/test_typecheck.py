"""mypy checks every use of a setting: the examples in tests/typecheck/ that misspell a setting,
use one as the wrong type, assign to one or declare one with a default of the wrong type fail;
the example that uses settings as declared passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api

from conftest import ROOT

EXAMPLES = ROOT / "tests" / "typecheck"
BAD = sorted(EXAMPLES.glob("bad_*.py"))


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """mypy's error lines for every example, by file name (one run for all: a cold run takes seconds)."""
    cache = tmp_path_factory.mktemp("mypy_cache")
    files = [str(p.relative_to(ROOT)) for p in [EXAMPLES / "good_settings.py", *BAD]]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # mypy finds tfwsgi from the working directory, as `make lint` runs it
        out, err, status = api.run(["--config-file", "pyproject.toml", "--cache-dir", str(cache),
                                    "--no-error-summary", "--show-error-codes", *files])
    assert status in (0, 1), err or out  # 2: mypy itself failed (bad config, crash)
    errors: dict[str, list[str]] = {Path(f).name: [] for f in files}
    for line in out.splitlines():
        path, _, rest = line.partition(":")
        if ": error: " in rest:
            errors[Path(path).name].append(rest)
    return errors


def _expected(example: Path) -> str:
    """The error an example's docstring (its first line) names."""
    first = example.read_text().splitlines()[0]
    return re.sub(r'^"""|\s*"""$', "", first).strip()


def test_settings_used_as_declared_pass_mypy(mypy_errors: dict[str, list[str]]) -> None:
    assert mypy_errors["good_settings.py"] == []


@pytest.mark.parametrize("example", BAD, ids=lambda p: p.stem)
def test_a_misused_setting_fails_mypy(mypy_errors: dict[str, list[str]], example: Path) -> None:
    expected = _expected(example)
    assert expected.startswith("error: ")
    found = mypy_errors[example.name]
    assert len(found) == 1 and expected in found[0], found


def test_there_are_bad_examples() -> None:
    assert {p.stem for p in BAD} >= {"bad_misspelled_setting", "bad_str_setting_as_int"}
