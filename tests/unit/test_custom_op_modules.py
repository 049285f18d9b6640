"""TFWSGI_CUSTOM_OP_MODULES: modules a worker imports before it loads a model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tfwsgi.application import create_app, import_custom_op_modules
from tfwsgi.errors import ConfigError
from tfwsgi.settings import Settings


def test_each_module_is_imported_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ops_a.py").write_text("import builtins\nbuiltins.tfwsgi_test_ops = ['a']\n")
    (tmp_path / "ops_b.py").write_text("import builtins\nbuiltins.tfwsgi_test_ops.append('b')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    try:
        import_custom_op_modules(" ops_a , ops_b ")
        assert builtins.tfwsgi_test_ops == ["a", "b"]  # type: ignore[attr-defined]
    finally:
        builtins.__dict__.pop("tfwsgi_test_ops", None)
        sys.modules.pop("ops_a", None)
        sys.modules.pop("ops_b", None)


def test_a_module_that_fails_to_import_is_a_config_error_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_ops.py").write_text("raise OSError('libfoo.so: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        import_custom_op_modules("broken_ops")
    assert str(info.value) == ("TFWSGI_CUSTOM_OP_MODULES: importing broken_ops failed: "
                               "OSError: libfoo.so: cannot open shared object")
    with pytest.raises(ConfigError, match="importing no_such_ops_module failed: ModuleNotFoundError"):
        import_custom_op_modules("no_such_ops_module")


def test_the_app_factory_imports_them_before_any_model_loads(tmp_path: Path) -> None:
    # No model exists at the base path: the import failure comes first, and stops the factory.
    settings = Settings(model_base_path=str(tmp_path / "none"), custom_op_modules="no_such_ops_module")
    with pytest.raises(ConfigError, match="no_such_ops_module"):
        create_app(settings=settings)
