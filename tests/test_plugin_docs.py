"""docs/plugins.md, the plugin author's guide, keeps up with the hook specs and the example plugin."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from kdreg import hookspecs

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "kdreg-example-plugin"


def hook_specs() -> list[str]:
    """Every function of kdreg.hookspecs marked as a hook spec."""
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(name for name, obj in vars(hookspecs).items()
                  if callable(obj) and hasattr(obj, marker))


def test_the_specs_are_found() -> None:
    specs = hook_specs()
    assert "kdreg_register_backbones" in specs and "kdreg_run_finished" in specs
    assert specs == sorted(n for n in vars(hookspecs) if n.startswith("kdreg_"))


@pytest.mark.parametrize("spec", hook_specs())
def test_every_hook_has_a_section_in_the_guide(spec: str) -> None:
    headings = [line for line in GUIDE.read_text().splitlines() if line.startswith("#")]
    assert any(f"`{spec}`" in h for h in headings), f"docs/plugins.md has no section on {spec}"


@pytest.mark.parametrize("path", ["pyproject.toml", "recipe.toml", "kdreg_example_plugin/__init__.py"])
def test_the_guide_shows_the_example_plugin_as_it_is(path: str) -> None:
    blocks = re.findall(r"^```\w*\n(.*?)^```$", GUIDE.read_text(), flags=re.S | re.M)
    assert (EXAMPLE / path).read_text() in blocks, f"docs/plugins.md does not show {path} verbatim"


def test_the_names_the_guide_uses_exist() -> None:
    names = set(re.findall(r"\bkdreg(?:\.[A-Za-z_]\w*)+", GUIDE.read_text()))
    assert "kdreg.StageRef" in names and "kdreg.TeacherStage" in names and "kdreg.BridgeBatch" in names
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"docs/plugins.md names {name}, which does not exist"
                obj = getattr(obj, attr)
            break


@pytest.mark.parametrize("topic", ["KDREG_DISABLE_PLUGINS", "shape=", '"<stage>:<label>"',
                                   "kdreg.hookspecs.Register", "kdreg.hookspecs.RunInfo"])
def test_the_guide_covers(topic: str) -> None:
    assert topic in GUIDE.read_text()
