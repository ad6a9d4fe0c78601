"""One error hierarchy: every error class qwen2ms defines derives from qwen2ms.Qwen2msError."""
import ast
import importlib
from pathlib import Path

import qwen2ms
from qwen2ms import Qwen2msError

SRC = Path(qwen2ms.__file__).resolve().parent


def _error_classes():
    """(module, class name) of every class in src/qwen2ms whose name ends in Error."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ".".join(("qwen2ms",) + path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                yield module, node.name


def test_every_library_error_derives_from_the_one_base():
    found = list(_error_classes())
    assert len(found) >= 15  # the walk found the classes (a broken walk would pass vacuously)
    outside = [f"{m}.{n}" for m, n in found if not issubclass(getattr(importlib.import_module(m), n), Qwen2msError)]
    assert outside == []


def test_one_checkpoint_error_and_the_builtin_bases_are_kept():
    from qwen2ms.checkpoint.mindformers import CheckpointNamingError
    from qwen2ms.checkpoint.mindspore import MSCheckpointError
    from qwen2ms.training import CheckpointError as TrainingCheckpointError

    assert TrainingCheckpointError is qwen2ms.CheckpointError
    for cls in (MSCheckpointError, CheckpointNamingError):
        assert issubclass(cls, qwen2ms.CheckpointError)
    assert issubclass(qwen2ms.CheckpointError, ValueError)
    assert issubclass(qwen2ms.TokenizerError, ValueError) and issubclass(qwen2ms.ConfigError, ValueError)
    assert issubclass(qwen2ms.HubError, OSError)
    assert issubclass(qwen2ms.NonFiniteLossError, RuntimeError)
    assert "Qwen2msError" in qwen2ms.__all__


def test_a_user_catches_one_thing(tmp_path):
    import pytest

    with pytest.raises(Qwen2msError, match="no config file"):
        qwen2ms.Qwen2Config.from_json(tmp_path)
    with pytest.raises(Qwen2msError):
        qwen2ms.load_run_config(tmp_path / "missing.yaml")
