"""benchmarks/run.py: its instruments count what they claim, and ``--quick`` writes every figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from probes import (  # noqa: E402
    HostReads,
    Interleaved,
    SavedBytes,
    conv_macs,
    kernel_class,
    kernel_seconds,
    median_ratio,
)

FIGURES = ("overhead_ratio", "width_cost_ratio", "slimmable_overhead_ratio", "distill_cost_ratio",
           "activation_memory_ratio", "teacher_saved_bytes", "loader_fraction", "host_syncs_per_step",
           "peer_ratio", "stream_loader_ratio", "stream_memory_ratio", "feature_loss_cost_ratio",
           "checkpoint_cost_ratio", "vit_slimmable_overhead_ratio", "stored_kd_cost_ratio",
           "store_memory_ratio")
#: the width figures reported with no target (the limit, the derived ResNet-18's three)
WIDTH_REPORTED = ("width_cost_limit", "width_cost_ratio_resnet18", "width_cost_limit_resnet18",
                  "slimmable_overhead_ratio_resnet18")
PLAIN_LAYERS = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)


def test_host_reads_counts_reads_of_values_with_their_call_site() -> None:
    t = torch.ones(3)
    with HostReads() as reads:
        t.sum().item()
        if t.any():
            t.tolist()
        t.add(1).mul(2)          # no read
        t.to("cpu")              # already on the host: no read
    assert reads.count == 3
    assert sorted(site.split(" at ")[0] for site in reads.sites) == ["__bool__", "item", "tolist"]
    assert all(" at tests/test_benchmarks.py:" in site for site in reads.sites), reads.sites


def test_saved_bytes_peak_counts_a_storage_once_and_releases_it() -> None:
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    with SavedBytes(exclude=[w]) as saved:
        h = (x @ w).relu()                 # saves x (64 KiB; w excluded) and relu's result
        out = (h * h).sum()                # saves h twice: one storage
    assert saved.peak == 2 * 64 * 256 * 4
    out.backward()
    del h, out
    assert saved.alive == 0
    with SavedBytes() as nothing, torch.no_grad():
        (x @ w).relu().sum()
    assert nothing.packed == 0 and nothing.peak == 0


def test_interleaved_runs_the_other_step_between_two_steps_of_the_loop() -> None:
    order: list[str] = []
    batch = (torch.zeros(1), torch.zeros(1))
    loader = Interleaved(object(), batch, 4, {"other": lambda: order.append("other")}, warmup=1,
                         device=torch.device("cpu"))
    for _ in loader:
        order.append("loop")
    assert order == ["other", "loop"] * 4
    assert len(loader.trainer_times) == len(loader.other_times["other"]) == 3


def test_median_ratio_alternates_the_sizes_and_one_odd_reading_does_not_decide_it() -> None:
    order: list[int] = []
    peaks = {2: iter([100, 10, 100]), 8: iter([110, 500, 110])}   # one low, one high reading

    def measure(n: int) -> float:
        order.append(n)
        return next(peaks[n])

    ratio, readings = median_ratio(measure, (2, 8), repeats=3)
    assert order == [2, 8, 8, 2, 2, 8]
    assert readings == {2: [100, 10, 100], 8: [110, 500, 110]}
    assert ratio == pytest.approx(1.1)


def test_every_figure_belongs_to_one_family_and_every_target_to_a_figure() -> None:
    import run

    figures = [k for family in run.FAMILIES for k in family.figures]
    assert len(figures) == len(set(figures))
    assert set(run.TARGETS) | set(run.REPORTED) == set(figures)
    assert set(run.RELATIVE.values()) <= set(run.REPORTED)


@pytest.mark.timeout(300)
def test_conv_macs_counts_each_conv_class_by_hand() -> None:
    """8x8 input: a 3x3 conv 3->16 (16*64 outputs x 3*9), a depthwise 3x3 on 16 channels with
    stride 2 (16*16 outputs x 9), a 1x1 conv 16->32 (32*16 outputs x 16)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1),
                              torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
                              torch.nn.Conv2d(16, 32, 1))
    macs = conv_macs(net, lambda: net(torch.randn(5, 3, 8, 8)))
    assert macs == {"other conv": 16 * 64 * 27, "depthwise conv": 16 * 16 * 9, "pointwise conv": 32 * 16 * 16}


def test_conv_macs_of_a_slimmable_width_count_its_channels_only() -> None:
    import kdreg

    model = kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=10)
    full = conv_macs(model, lambda: model.forward_submodel(torch.randn(1, 3, 32, 32), 3))
    quarter = conv_macs(model, lambda: model.forward_submodel(torch.randn(1, 3, 32, 32), 0))
    assert sum(full.values()) + 10 * 1024 == model.count_macs((32, 32))[3]   # the classifier's
    assert sum(quarter.values()) + 10 * 256 == model.count_macs((32, 32))[0]
    assert quarter["depthwise conv"] * 4 == full["depthwise conv"]          # channels x 1/4


def test_kernel_seconds_puts_each_op_in_its_class() -> None:
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    pointwise, depthwise = torch.randn(8, 8, 1, 1), torch.randn(8, 1, 3, 3)
    bn = torch.nn.BatchNorm2d(8)

    def step() -> None:
        h = torch.nn.functional.conv2d(x, pointwise)
        h = torch.nn.functional.conv2d(h, depthwise, padding=1, groups=8)
        bn(h).relu().sum().backward()

    seconds = kernel_seconds(step, rounds=2)
    assert all(seconds[c] > 0 for c in ("pointwise conv", "depthwise conv", "batch norm + relu", "the rest"))
    assert seconds["other conv"] == 0
    assert kernel_class("aten::convolution_backward", [[4, 8, 16, 16], [4, 8, 16, 16], [8, 1, 3, 3]]) \
        == "depthwise conv"
    assert kernel_class("aten::native_batch_norm_backward", [[4, 8, 16, 16]]) == "batch norm + relu"
    assert kernel_class("aten::add_", [[8], [8]]) == "the rest"


@pytest.mark.processes
@pytest.mark.timeout(620)   # every family's jobs, seven of them starting processes of their own
def test_quick_run_writes_every_figure_with_its_target(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--json", str(out),
                           "--quick", "--batch", "8", "--steps", "1", "--threads", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(FIGURES) <= set(result) and set(result["targets"]) == set(FIGURES)
    for key in FIGURES:
        value = result[key]
        if value is None:
            assert result["notes"][key].startswith("missing: ")
            assert result["passed"][key] is None
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value)
            assert isinstance(result["passed"][key], bool)
        assert key in proc.stdout
    assert result["teacher_saved_bytes"] == 0           # the teacher runs under no_grad
    assert 0 < result["activation_memory_ratio"] < 1    # one width's activations at a time
    assert 0 < result["loader_fraction"] < 1
    assert 0 < result["loader_fraction_streamed"] < 1 and "loader_fraction_streamed" in proc.stdout
    assert result["targets"]["stream_loader_ratio"] == ">= 1.2"
    assert result["details"]["stream_loader_ratio"]["images"] == 64
    assert set(result["details"]["stream_memory_ratio"]) >= {"32", "64"}
    memory = result["details"]["stream_memory_ratio"]
    assert memory["repeats"] == 1 and all(len(memory[n]["readings"]) == 1 for n in ("32", "64"))
    assert result["machine"]["torch"] == torch.__version__
    assert result["targets"]["overhead_ratio"] == "<= 1.05"
    assert result["machine"]["host_memory_kept"] is True
    for key in WIDTH_REPORTED:                          # the width figures against plain networks
        assert isinstance(result[key], float) and result[key] > 0, (key, result["notes"].get(key))
        assert key in proc.stdout
    assert result["targets"]["feature_loss_cost_ratio"] == "<= 1.05"
    assert isinstance(result["crd_cost_ratio"], float) and "crd_cost_ratio" in proc.stdout
    steps = result["details"]["feature_loss_cost_ratio"]
    assert result["feature_loss_cost_ratio"] == pytest.approx(steps["kd_at_step_s"] / steps["kd_step_s"])
    assert result["crd_cost_ratio"] == pytest.approx(steps["kd_crd_step_s"] / steps["kd_step_s"])
    assert result["targets"]["width_cost_ratio"] == "<= 1.02 x width_cost_limit"
    assert result["targets"]["slimmable_overhead_ratio"] == "<= 1.02"
    judged = result["details"]["width_cost_ratio"]
    assert judged["bound"] == pytest.approx(1.02 * result["width_cost_limit"])
    assert result["passed"]["width_cost_ratio"] == (result["width_cost_ratio"] <= judged["bound"])
    assert "width_cost_ratio (raw)" in proc.stdout
    limit = result["details"]["width_cost_limit"]
    assert set(limit["plain_step_s"]) == {"x0.25_step_s", "x0.5_step_s", "x0.75_step_s", "x1.0_step_s"}
    assert result["details"]["width_cost_ratio_resnet18"]["input_size"] == [64, 64]
    rows = result["details"]["width_cost_ratio"]["breakdown"]   # where the width cost goes
    assert rows["pointwise conv"]["mac_ratio"] == pytest.approx(1.875)      # 1/16 + 1/4 + 9/16 + 1
    assert rows["depthwise conv"]["mac_ratio"] == pytest.approx(2.5)
    assert all(len(r["ms_per_width"]) == 4 and r["time_ratio"] > 1 for r in rows.values())
    assert "by kernel class" in proc.stdout
    assert result["targets"]["vit_slimmable_overhead_ratio"] == "<= 1.05"   # the transformers
    vit = result["details"]["vit_slimmable_overhead_ratio"]
    assert set(vit["plain_step_s"]) == {"x0.25", "x0.5", "x0.75", "x1.0"} and vit["input_size"] == [64, 64]
    assert result["vit_slimmable_overhead_ratio"] == pytest.approx(vit["ipkd-ta-m_step_s"] / vit["plain_sum_s"])
    assert isinstance(result["deit_token_kd_ratio"], float) and "deit_token_kd_ratio" in proc.stdout


def test_bad_flags_are_errors_with_a_line_each_and_nothing_written(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import run

    out = tmp_path / "bench.json"
    assert run.main(["--json", str(out), "--data", str(tmp_path / "absent"), "--steps", "5"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --data {tmp_path / 'absent'}: no such folder or archive",
                     "error: --steps 5: every time is a median of at least 20 steps "
                     "(--quick for a smoke test of fewer)"]
    assert not out.exists()


def test_host_syncs_figure_finds_the_trainers_loss_read_on_its_logging_step(tmp_path,
                                                                            monkeypatch) -> None:
    import steps
    from common import Settings

    settings = Settings(device=torch.device("cpu"), batch=4, steps=1, warmup=0, size=16)
    normal = steps.host_syncs(settings, tmp_path)
    assert normal.value == 0 and normal.details["sites"] == {}
    within = steps.WithinStep
    monkeypatch.setattr(steps, "WithinStep", lambda loader, steps, step, context:
                        within(loader, steps, steps - 1, context))   # the last step logs
    logging = steps.host_syncs(settings, tmp_path)
    assert logging.value >= 1
    assert any(" at kdreg/engine/trainer.py:" in site for site in logging.details["sites"])


def test_channels_last_flag_reaches_the_trainers_config() -> None:
    import run
    from common import train_config

    def config(*flags: str):
        args = run.parser().parse_args(["--json", "out.json", "--quick", "--device", "cpu", *flags])
        return train_config(run.settings_from(args))

    assert config().channels_last is True      # the recipe default
    assert config("--channels-last", "false").channels_last is False
    assert config("--channels-last", "true").channels_last is True


@pytest.mark.parametrize("widths", [(0.25, 0.5, 0.75, 1.0), (0.3, 0.55, 1.0)])
def test_plain_mobilenets_hold_exactly_each_widths_parameters(widths) -> None:
    """The plain networks of width_cost_limit: ordinary layers, one network per width, each with
    the parameters (count and shapes) that width of kdreg's slimmable MobileNet-V1 uses; odd
    widths check the channel rule (int(c * w), at least 1)."""
    import width

    import kdreg

    model = kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=width.NUM_CLASSES, widths=list(widths))
    nets = width.plain_mobilenets(model, torch.device("cpu"))   # asserts the counts itself
    assert [sum(p.numel() for p in net.parameters()) for net in nets] == model.count_params()
    for i, net in enumerate(nets):
        assert [p.shape for p in net.parameters()] == \
            [p.shape for p in model.export_submodel(i).parameters()]
        assert all(type(m) in PLAIN_LAYERS for m in net.modules() if list(m.parameters(recurse=False)))
        assert all(type(m).__module__.startswith("torch.nn") for m in net.modules() if m is not net)
    assert nets[-1](torch.randn(2, 3, 32, 32)).shape == (2, width.NUM_CLASSES)
    with pytest.raises(AssertionError, match="parameters"):
        width.check_params(nets[::-1], model)


def test_resnet18_widths_export_as_plain_networks_of_their_parameters() -> None:
    pytest.importorskip("timm")
    import width

    import kdreg

    model = kdreg.build_backbone("slimmable", num_classes=width.NUM_CLASSES,
                                 input_size=(width.RESNET18_SIZE, width.RESNET18_SIZE), **width.RESNET18)
    nets = [model.export_submodel(i) for i in range(model.num_submodels)]
    width.check_params(nets, model)
    for net in nets:
        assert all(type(m) in PLAIN_LAYERS for m in net.modules() if list(m.parameters(recurse=False)))


def test_width_cost_ratio_is_judged_against_its_limit() -> None:
    import run
    from common import Figure, Settings

    settings = Settings(device=torch.device("cpu"))

    def judged(ratio: float, limit: float | None) -> tuple[bool | None, str]:
        figures = {"width_cost_ratio": Figure(ratio), "width_cost_limit": Figure(limit)}
        result = run.report(figures, settings)
        return result["passed"]["width_cost_ratio"], run.table(result)

    assert judged(2.3, 2.28)[0] is True       # 2.3 <= 1.02 x 2.28 = 2.3256
    ok, shown = judged(2.3, 2.2)               # 2.3 > 1.02 x 2.2 = 2.244
    assert ok is False and "width_cost_ratio (raw)" in shown and "= 2.244" in shown
    assert judged(2.3, None)[0] is None        # no limit measured: not judged


def test_a_family_alone_reports_and_judges_its_own_figures_only() -> None:
    import run
    from common import Figure, Settings

    store = dict(zip(run.FAMILY_MODULES, run.FAMILIES))["store"]
    figures = {k: Figure(1.0) for k in store.figures}
    result = run.report(figures, Settings(device=torch.device("cpu")))
    assert set(result["targets"]) == set(result["passed"]) == set(store.targets) != set()
    assert all(result["passed"].values())
    listed = {line.split()[0] for line in run.table(result).splitlines()[2:]}
    assert listed == set(store.figures)
    with pytest.raises(SystemExit):
        run.parser().parse_args(["--json", "x.json", "--family", "nonesuch"])
