"""Third-party plugins found through real entry points (distributions installed into tmp_path)."""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdreg
from kdreg import plugins, registry
from kdreg.cli import main
from kdreg.errors import PluginError


def install_plugin(site: Path, dist: str, module: str, source: str, version: str = "1.2.3",
                   entry_point: str | None = None) -> None:
    """Write a plugin module and its distribution's metadata (as pip would) into ``site``; the
    entry point is named ``entry_point`` (default: the module's name)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kdreg]\n{entry_point or module} = {module}\n")


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


def test_cli_reports_a_broken_plugin_with_exit_2_and_no_traceback(site: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    install_plugin(site, "kdreg-broken", "kdreg_demo_broken", "raise ImportError('half installed')\n")
    monkeypatch.delenv("KDREG_DISABLE_PLUGINS", raising=False)
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert "kdreg-broken" in err and "half installed" in err
    assert "Traceback" not in err
    monkeypatch.setenv("KDREG_DISABLE_PLUGINS", "kdreg_demo_broken")
    plugins.reset()
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "backbones  (kdreg " in out and "slimmable_mobilenet_v1" in out
    assert "disabled by KDREG_DISABLE_PLUGINS: kdreg_demo_broken" in out


MISSPELLED = """
    import kdreg
    @kdreg.hookimpl
    def kdreg_register_graph(register):
        pass
"""


def test_a_misspelled_hook_is_an_error_naming_plugin_and_distribution(site: Path) -> None:
    install_plugin(site, "kdreg-typo", "kdreg_demo_typo", MISSPELLED, version="0.3.0")
    with pytest.raises(PluginError) as err:
        plugins.make_plugin_manager()
    msg = str(err.value)
    assert "plugin 'kdreg_demo_typo' from distribution kdreg-typo 0.3.0 implements kdreg_register_graph" in msg
    assert "did you mean kdreg_register_graphs?" in msg and "KDREG_DISABLE_PLUGINS=kdreg_demo_typo" in msg


def test_a_misspelled_hook_of_a_local_plugin_is_an_error(site: Path) -> None:
    class Typo:
        __name__ = "typo"

        @kdreg.hookimpl
        def kdreg_run_finish(self, run, results):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(PluginError, match="plugin 'typo' implements kdreg_run_finish.*did you mean kdreg_run_finished"):
        plugins.make_plugin_manager(extra=[Typo()])


def test_an_optional_hook_of_a_later_kdreg_is_accepted(site: Path) -> None:
    class Later:
        __name__ = "later"

        @kdreg.hookimpl(optionalhook=True)
        def kdreg_register_optimizers(self, register):  # type: ignore[no-untyped-def]
            pass

    pm = plugins.make_plugin_manager(extra=[Later()])
    assert plugins.distribution_of(pm, "later") == ("local", "")


def test_an_undecorated_hook_is_an_error(site: Path) -> None:
    install_plugin(site, "kdreg-plain", "kdreg_demo_plain", """
        def kdreg_register_graphs(register):
            register("never", lambda num_submodels: None)
    """)
    with pytest.raises(PluginError, match=r"'kdreg_demo_plain' from distribution kdreg-plain 1.2.3 defines "
                                          r"kdreg_register_graphs without the @kdreg.hookimpl decorator"):
        plugins.make_plugin_manager()


CLASH = """
    import kdreg
    from kdreg import Edge, TeacherGraph

    @kdreg.hookimpl
    def kdreg_register_graphs(register):
        register("clash-graph", lambda num_submodels: TeacherGraph(num_submodels, ()), "from a clashing name")
"""


def test_a_third_party_entry_point_named_like_a_builtin_one_is_loaded(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(site, "kdreg-clash", "kdreg_demo_clash", CLASH, version="2.0.0", entry_point="graphs")
    pm = plugins.make_plugin_manager()
    names = dict(pm.list_name_plugin())
    assert names["graphs"].__name__ == "kdreg_plugins.graphs"
    assert names["kdreg-clash:graphs"].__name__ == "kdreg_demo_clash"
    assert plugins.distribution_of(pm, "kdreg-clash:graphs") == ("kdreg-clash", "2.0.0")
    assert plugins.distribution_of(pm, "graphs")[0] == "kdreg"
    assert plugins.plugin_set(pm).plugins["kdreg-clash:graphs"].entry_point == "graphs"
    assert not hasattr(pm, "kdreg_dists")  # kdreg's data is kdreg's, not an attribute on pluggy's object
    graphs = registry.collect("graph", pm)
    assert graphs.get("clash-graph").distribution == "kdreg-clash" and "ipkd" in graphs
    assert plugins.plugin_versions(pm)["kdreg-clash"] == "2.0.0"
    for disabled in ("kdreg-clash:graphs", "kdreg-clash", "KDREG_clash"):
        monkeypatch.setenv(plugins.DISABLE_ENV, disabled)
        names = dict(plugins.make_plugin_manager().list_name_plugin())
        assert "kdreg-clash:graphs" not in names and "graphs" in names, disabled


ONLY_SPEC = """
    import torch
    from torch import nn
    import kdreg

    class TwoExit(kdreg.FlexibleBackbone):
        submodel_labels = ("early", "final")
        single_pass = True

        def __init__(self, num_classes, features, hidden):
            super().__init__()
            self.stem = nn.Linear(features, hidden)
            self.early = nn.Linear(hidden, num_classes)
            self.body = nn.Linear(hidden, hidden)
            self.final = nn.Linear(hidden, num_classes)

        def forward(self, x):
            h = torch.relu(self.stem(x.flatten(1)))
            return [self.early(h), self.final(torch.relu(self.body(h)))]

    class NoForward(kdreg.FlexibleBackbone):
        submodel_labels = ["a", "a:b"]
        single_pass = 1

    class Widths(kdreg.FlexibleBackbone):
        submodel_labels = ("narrow", "wide")
        single_pass = False

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward_submodel(self, x, index):
            return self.fc(x.flatten(1)[:, :4])

    class Labels(kdreg.FlexibleBackbone):
        submodel_labels = ("a", "a")

        def forward(self, x):
            return [x.flatten(1), x.flatten(1)]

    class Points(kdreg.FlexibleBackbone):
        def forward(self, x):
            return [x.flatten(1)]

        def split_points(self):
            return ("layer1",)

    def two_exit(*, num_classes: int, in_chans: int, input_size: tuple[int, int], hidden: int = 6):
        return TwoExit(num_classes, in_chans * input_size[0] * input_size[1], hidden)

    @kdreg.hookimpl
    def kdreg_register_backbones(register):
        register("only_spec", two_exit)
        register("no_forward", lambda **_: NoForward())
        register("widths_uncounted", lambda **_: Widths())
        register("same_labels", lambda **_: Labels())
        register("points_no_segment", lambda **_: Points())
        register("not_a_module", lambda **_: object())
"""


def test_a_backbone_with_only_what_the_spec_documents_is_counted(site: Path) -> None:
    install_plugin(site, "kdreg-spec", "kdreg_demo_spec", ONLY_SPEC)
    model = kdreg.build_backbone("only_spec", num_classes=3, in_chans=2, input_size=(4, 5), hidden=6)
    stem, early, body, final = 40 * 6 + 6, 6 * 3 + 3, 6 * 6 + 6, 6 * 3 + 3
    assert model.count_params() == [stem + early, stem + body + final]
    assert model.count_macs() == [40 * 6 + 6 * 3, 40 * 6 + 6 * 6 + 6 * 3]
    model.train()
    model.requires_grad_(False)  # a frozen model counts the same and stays as it was
    assert model.count_params() == [stem + early, stem + body + final]
    assert model.training and not any(p.requires_grad for p in model.parameters())
    assert kdreg.api.capacity_ratio(model, model) == {"params": 1.0, "macs": 1.0}


def test_a_backbone_breaking_the_spec_is_reported_with_its_plugin(site: Path) -> None:
    install_plugin(site, "kdreg-spec", "kdreg_demo_spec", ONLY_SPEC, version="0.0.2")
    who = r"backbone '{}' of plugin 'kdreg_demo_spec' \(kdreg-spec\) returned a {} that breaks the contract of kdreg_register_backbones: "
    with pytest.raises(kdreg.errors.RecipeError) as err:
        kdreg.build_backbone("no_forward", num_classes=3)
    assert len(err.value.problems) == 2
    assert err.match(who.format("no_forward", "NoForward") + r"submodel_labels must be a non-empty tuple of strings, got \['a', 'a:b'\] @ backbone.name")
    assert err.match(r"single_pass must be True or False, got 1 @ backbone.name")
    with pytest.raises(kdreg.errors.RecipeError, match=who.format("widths_uncounted", "Widths") + "a multi-pass backbone with several sub-models must implement count_params"):
        kdreg.build_backbone("widths_uncounted", num_classes=3)
    with pytest.raises(kdreg.errors.RecipeError, match=r"submodel_labels \('a', 'a'\) must be distinct"):
        kdreg.build_backbone("same_labels", num_classes=3)
    with pytest.raises(kdreg.errors.RecipeError, match=r"names split points \('layer1',\) but does not implement forward_segment"):
        kdreg.build_backbone("points_no_segment", num_classes=3)
    with pytest.raises(kdreg.errors.RecipeError, match=r"backbone 'not_a_module' of plugin 'kdreg_demo_spec' \(kdreg-spec\) "
                                                       r"returned object, not a kdreg.FlexibleBackbone"):
        kdreg.build_backbone("not_a_module", num_classes=3)


def test_hooks_are_typed_with_protocols() -> None:
    from kdreg import hookspecs

    for name in ("kdreg_register_backbones", "kdreg_register_graphs", "kdreg_register_bridges",
                 "kdreg_register_datasets"):
        assert inspect.signature(getattr(hookspecs, name)).parameters["register"].annotation == "Register"
    for name in ("kdreg_run_started", "kdreg_epoch_finished", "kdreg_stage_finished", "kdreg_run_finished"):
        assert inspect.signature(getattr(hookspecs, name)).parameters["run"].annotation == "RunInfo"


def test_counts_read_from_the_graph_agree_with_running_each_exit_alone() -> None:
    from kdreg.backbone import FlexibleBackbone
    from kdreg.measure import macs_depended_on

    model = kdreg.build_backbone("tiny_exits", num_classes=4)  # a conv net whose exits run alone
    for size in (None, (16, 16)):
        assert macs_depended_on(model, model.forward, size) == FlexibleBackbone.count_macs(model, size)


def engine_imports(path: Path) -> list[str]:
    """``file:line module`` of every import of ``kdreg.engine`` (or a module under it) in ``path``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        names = [n for n in names if n == "kdreg.engine" or n.startswith("kdreg.engine.")]
        found += [f"{path.name}:{node.lineno} {n}" for n in names[:1]]
    return found


def test_no_builtin_plugin_imports_the_engine(tmp_path: Path) -> None:
    """Built-ins use the contract modules a third party has (kdreg.process, kdreg.pointwise,
    kdreg.weight_decay, ...), never the engine's internals."""
    root = Path(__file__).resolve().parents[1] / "plugins"
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    assert [hit for f in files for hit in engine_imports(f)] == []
    # the check sees imports of every form
    probe = tmp_path / "probe.py"
    probe.write_text("import kdreg.engine.run\nfrom kdreg.engine import distributed\n"
                     "def f():\n    from kdreg.engine.optim import build_optimizer\n"
                     "from kdreg import process\n")
    assert [h.split()[1] for h in engine_imports(probe)] == ["kdreg.engine.run", "kdreg.engine",
                                                             "kdreg.engine.optim"]
