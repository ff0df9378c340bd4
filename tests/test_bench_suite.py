"""``mmkern bench``: a run's files (results, report, plots), comparing runs and the regression exit
code, the command line's refusals, the README's generated performance section, and pytest-benchmark."""

import json
import os
import subprocess
import sys

import pytest

from mmkern import cli
from mmkern.bench import command
from mmkern.bench.report import README_BEGIN, README_END, newest_run, readme_section, update_readme
from mmkern.bench.suite import suites

# Timing loops: through Triton's interpreter they would time the interpreter, for most of CI's time.
pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--device", "cpu", "--no-compile", "--budget", "0.05", "--repeats", "3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert (
        command.main(
            [
                *TINY,
                "--ops",
                "quantize_per_token,quantized_fusion",
                "--cases",
                "small_tokens,small_three_modalities",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (run_dir,) = out.iterdir()
    return run_dir


def test_a_run_writes_results_report_and_plots(tiny_run):
    with open(tiny_run / "results.json") as handle:
        saved = json.load(handle)
    assert saved["preset"] == "quick" and saved["environment"]["device_type"] == "cpu"
    assert saved["ceilings"]["copy_gbps"] > 0 and "float32" in saved["ceilings"]["matmul_tflops"]
    ops_run = {r["op"] for r in saved["records"]}
    assert ops_run == {"quantize_per_token", "quantized_fusion"}
    for r in saved["records"]:
        assert r["median_ms"] > 0 and r["bandwidth_fraction"] > 0
    assert {r["provider"] for r in saved["records"]} == {"mmkern", "eager"}
    csv_lines = (tiny_run / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(saved["records"])
    report = (tiny_run / "report.md").read_text()
    assert "## quantize_per_token, float32" in report and "measured ceilings" in report
    plots = sorted(p.name for p in (tiny_run / "plots").iterdir())
    assert plots == ["quantize_per_token-float32-forward.png", "quantized_fusion-float32-forward.png"]
    for name in plots:
        assert f"(plots/{name})" in report
        assert (tiny_run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _saved_run(path, medians, device="cpu-a", timestamp="2026-01-01T00:00:00+00:00"):
    records = [
        {"op": "op", "case": case, "provider": "mmkern", "mode": "forward", "dtype": "float32", "median_ms": ms}
        for case, ms in medians.items()
    ]
    path.write_text(json.dumps({"environment": {"device": device, "timestamp": timestamp}, "records": records}))
    return str(path)


def test_compare_exits_non_zero_on_a_regression_over_the_threshold(tmp_path, capsys):
    old = _saved_run(tmp_path / "old.json", {"a": 1.0, "b": 2.0, "gone": 1.0})
    new = _saved_run(tmp_path / "new.json", {"a": 1.05, "b": 1.0, "added": 1.0})
    assert command.main(["--compare", old, new]) == 0
    assert command.main(["--compare", old, new, "--fail-if-regression", "10"]) == 0
    assert command.main(["--compare", old, new, "--fail-if-regression", "4"]) == 1
    out = capsys.readouterr().out
    assert "+5.0% REGRESSION" in out and "-50.0%" in out and "1 regression(s) over 4%" in out
    assert "only in the old run: op gone" in out and "only in the new run: op added" in out


def test_compare_a_new_run_with_a_saved_one(tiny_run, tmp_path, capsys):
    old = str(tiny_run / "results.json")
    code = command.main(
        [
            *TINY,
            "--ops",
            "quantize_per_token",
            "--cases",
            "small_tokens",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--compare",
            old,
            "--fail-if-regression",
            "1000",
        ]
    )
    assert code == 0
    assert "0 regression(s) over 1000%" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ops", "nonsense"], "--ops: unknown ['nonsense']"),
        (["--dtype", "int8"], "--dtype: expected floating dtypes"),
        (["--modes", "sideways"], "--modes: unknown ['sideways']"),
        (["--fail-if-regression", "5"], "--fail-if-regression needs --compare"),
        (["--cases", "nonsense", "--ops", "quantize_per_token"], "--cases: none of ['nonsense']"),
    ],
)
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main([*TINY, "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_op_has_cases_for_its_presets_on_every_device():
    for suite in suites():
        for preset in suite.presets:
            for device_type in ("cpu", "cuda"):
                assert suite.cases(preset, device_type), (suite.op, preset, device_type)
        assert suite.reference and suite.modes


def test_the_console_command(capsys):
    assert cli.main(["bench", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for suite in suites():
        assert suite.op in out


def test_the_readme_performance_section_is_the_newest_runs():
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as handle:
        text = handle.read()
    run = newest_run(os.path.join(ROOT, "benchmarks", "results"))
    assert run is not None, "benchmarks/results has no run folder"
    section = text[text.index(README_BEGIN) : text.index(README_END) + len(README_END)]
    assert section == readme_section(run, os.path.abspath(ROOT)), "run `mmkern bench --update-readme`"


def test_the_results_folder_holds_runs_in_the_current_format_alone():
    """A folder per run (results.json, results.csv, report.md), and archive/ for the files of the format
    before it, which no tool reads."""
    root = os.path.join(ROOT, "benchmarks", "results")
    for name in sorted(os.listdir(root)):
        if name == "archive":
            continue
        files = set(os.listdir(os.path.join(root, name))) if os.path.isdir(os.path.join(root, name)) else None
        assert files is not None and {"results.json", "results.csv", "report.md"} <= files, name


def test_update_readme_writes_the_section(tiny_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold\n{README_END}\n\nafter\n")
    assert update_readme(str(readme), str(tiny_run.parent)) is True
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{README_END}\n\nafter\n") and "quantize_per_token" in text
    assert "No GPU run is recorded yet" in text
    assert update_readme(str(readme), str(tiny_run.parent)) is False
    readme.write_text("no section")
    with pytest.raises(ValueError, match="no performance section"):
        update_readme(str(readme), str(tiny_run.parent))


def test_pytest_benchmark_runs_the_same_cases():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(ROOT, "benchmarks"),
            "--benchmark-only",
            "-k",
            "small_three_modalities",
            "--benchmark-min-rounds=2",
            "--benchmark-max-time=0.01",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test_benchmark[quantized_fusion-small_three_modalities-float32-forward-mmkern]" in result.stdout
