"""Every YAML in configs/ is run by some test with a tiny setting, so none of them rots."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_exercised_by_a_test(name):
    users = [p.name for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_configs.py" and name in p.read_text()]
    assert users, f"configs/{name} is not run by any test: add one with a tiny setting"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_names_a_lit_fast_task(name):
    import yaml

    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    class_path = config["model"]["class_path"]
    assert class_path.startswith("lit_fast."), class_path
    import lit_fast

    assert hasattr(lit_fast, class_path.split(".", 1)[1]), f"{class_path} is not exported by lit_fast"
