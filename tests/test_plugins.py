"""Third-party plugins found through real entry points (distributions installed into tmp_path)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdreg
from kdreg import plugins, registry
from kdreg.errors import PluginError


def install_plugin(site: Path, dist: str, module: str, source: str, version: str = "1.2.3") -> None:
    """Write a plugin module and its distribution's metadata (as pip would) into ``site``."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kdreg]\n{module} = {module}\n")


GOOD = """
    import torch
    from torch import nn
    import kdreg
    from kdreg import Edge, TeacherGraph

    class Net(kdreg.FlexibleBackbone):
        submodel_labels = ("small", "large")
        single_pass = True

        def __init__(self, num_classes, hidden=8):
            super().__init__()
            self.a = nn.Linear(3 * 8 * 8, hidden)
            self.h1 = nn.Linear(hidden, num_classes)
            self.h2 = nn.Linear(hidden, num_classes)

        def forward(self, x):
            h = torch.relu(self.a(x.flatten(1)))
            return [self.h1(h), self.h2(h)]

        def count_params(self):
            return [sum(p.numel() for p in m.parameters()) for m in (self.a, self.h1)] and [1, 2]

    def build(*, num_classes: int, hidden: int = 8, **_):
        "A two-exit MLP from a third-party package."
        return Net(num_classes, hidden)

    def everyone_from_largest(num_submodels: int, weight: float = 1.0):
        n = num_submodels
        return TeacherGraph(n, tuple(Edge(i, n - 1, weight) for i in range(n - 1)), name="largest")

    @kdreg.hookimpl
    def kdreg_register_backbones(register):
        register("demo_net", build)

    @kdreg.hookimpl
    def kdreg_register_graphs(register):
        register("largest", everyone_from_largest, "Every sub-model taught by the largest.")
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    plugins.reset()
    yield site
    for name in list(sys.modules):
        if name.startswith("kdreg_demo_"):
            del sys.modules[name]
    plugins.reset()


def test_a_third_party_plugin_registers_like_a_builtin(site: Path) -> None:
    install_plugin(site, "kdreg-demo", "kdreg_demo_good", GOOD)
    assert "demo_net" in registry.list_backbones() and "largest" in registry.list_graphs()
    entry = registry.get_registry("backbone").get("demo_net")
    assert entry.distribution == "kdreg-demo" and entry.description == "A two-exit MLP from a third-party package."
    model = kdreg.build_backbone("demo_net", num_classes=4, hidden=5)
    g = kdreg.get_teacher_graph("largest", model.num_submodels, weight=0.5)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    kdreg.distillation_loss(model(x), y, g, lam=0.5, tau=1.0).backward()
    assert model.a.weight.grad is not None
    assert plugins.plugin_versions()["kdreg-demo"] == "1.2.3"
    with pytest.raises(kdreg.errors.RecipeError, match="expected an integer.*@ backbone.hidden"):
        kdreg.build_backbone("demo_net", num_classes=4, hidden="wide")


def test_a_duplicate_name_names_both_plugins(site: Path) -> None:
    install_plugin(site, "kdreg-dup", "kdreg_demo_dup", """
        import kdreg
        @kdreg.hookimpl
        def kdreg_register_graphs(register):
            register("ipkd", lambda num_submodels: None)
    """)
    with pytest.raises(PluginError) as err:
        registry.list_graphs()
    msg = str(err.value)
    assert "graph 'ipkd' is registered twice" in msg
    assert "'graphs' (kdreg)" in msg and "'kdreg_demo_dup' (kdreg-dup)" in msg


def test_a_broken_plugin_is_reported_with_its_distribution_and_can_be_disabled(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(site, "kdreg-broken", "kdreg_demo_broken", "import not_a_module_anywhere\n", version="0.0.1")
    with pytest.raises(PluginError, match=r"plugin 'kdreg_demo_broken' from distribution kdreg-broken 0.0.1 "
                                          r"failed to import: ModuleNotFoundError.*KDREG_DISABLE_PLUGINS"):
        plugins.make_plugin_manager()
    monkeypatch.setenv("KDREG_DISABLE_PLUGINS", "kdreg-broken")
    pm = plugins.make_plugin_manager()
    assert "kdreg_demo_broken" not in dict(pm.list_name_plugin())
    assert "backbones" in dict(pm.list_name_plugin())


def test_a_bad_hook_implementation_is_reported(site: Path) -> None:
    install_plugin(site, "kdreg-badhook", "kdreg_demo_badhook", """
        import kdreg
        @kdreg.hookimpl
        def kdreg_register_backbones(register, extra):
            pass
    """)
    with pytest.raises(PluginError, match=r"kdreg_demo_badhook' from distribution kdreg-badhook 1.2.3 has a bad hook"):
        plugins.make_plugin_manager()


def test_a_plugin_failing_inside_its_hook_is_reported(site: Path) -> None:
    install_plugin(site, "kdreg-raises", "kdreg_demo_raises", """
        import kdreg
        @kdreg.hookimpl
        def kdreg_register_datasets(register):
            raise RuntimeError("no data today")
    """)
    with pytest.raises(PluginError, match=r"'kdreg_demo_raises' \(kdreg-raises\) failed in kdreg_register_datasets: "
                                          r"RuntimeError: no data today"):
        registry.list_datasets()


def test_cli_reports_a_broken_plugin_with_exit_2_and_no_traceback(site: Path) -> None:
    install_plugin(site, "kdreg-broken", "kdreg_demo_broken", "raise ImportError('half installed')\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "kdreg.cli", "plugins"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "kdreg-broken" in proc.stderr and "half installed" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = subprocess.run(cmd, capture_output=True, text=True, env={**env, "KDREG_DISABLE_PLUGINS": "kdreg_demo_broken"})
    assert ok.returncode == 0, ok.stderr
    assert "backbones  (kdreg " in ok.stdout and "slimmable_mobilenet_v1" in ok.stdout
    assert "disabled by KDREG_DISABLE_PLUGINS: kdreg_demo_broken" in ok.stdout
