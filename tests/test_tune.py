"""The tuning sweep (mmkern tune) and the tile tables it writes: shape classes, reading a table on its
GPU model, and, through Triton's interpreter, the plan, the candidates' checks and the written table."""

import dataclasses
import json

import pytest
import torch

from mmkern import _config, ops, reference
from mmkern.bench import tune
from mmkern.bench.suite import suites
from mmkern.kernels import tiles
from mmkern.kernels.tiles import AttentionTile, GemmTile

interpreter_only = pytest.mark.skipif(
    not _config.TRITON_ON_CPU, reason="the sweep runs the GPU path: CUDA or the interpreter"
)
WIDE = GemmTile(64, 128, 64, 8, 4, 3)


def _table(entries: dict) -> dict:
    return {
        "gpu": "test",
        "families": {
            family: {key: {"tile": tiles.tile_entry(tile)} for key, tile in by_key.items()}
            for family, by_key in entries.items()
        },
    }


def test_shape_classes_round_sizes_up_and_keep_head_dims_and_dtypes():
    assert tiles.shape_class("gemm", 1000, 300, 700, torch.bfloat16, 132) == "bfloat16/m1024/n512/k1024"
    assert tiles.shape_class("gemm", 1, 20000, 0, torch.int8, 132) == "int8/m16/n8192/k16"
    assert tiles.shape_class("attention_forward", 5, 64, 32, torch.float16) == "float16/q16/d64/dv32"
    assert tiles.shape_class("attention_backward", 128, 128, torch.float32) == "float32/d128/dv128"
    with pytest.raises(ValueError, match="family must be one of"):
        tiles.shape_class("conv", 1, 2, torch.float32)


def test_a_table_chooses_the_tile_of_its_classes_and_only_those():
    default, other_dtype = (tiles.gemm_tile(1000, 300, 700, dtype, 132) for dtype in (torch.bfloat16, torch.float16))
    table = _table(
        {
            "gemm": {"bfloat16/m1024/n512/k1024": WIDE},
            "attention_forward": {"float16/q64/d64/dv64": AttentionTile(64, 32, 4, 2)},
            "attention_backward": {"float16/d64/dv64": AttentionTile(32, 64, 8, 1)},
        }
    )
    with tiles.use_table(table):
        assert tiles.overridden()  # cached launch plans step aside
        assert tiles.gemm_tile(1000, 300, 700, torch.bfloat16, 132) == WIDE
        assert tiles.gemm_tile(600, 257, 513, torch.bfloat16, 132) == WIDE  # the same class
        assert tiles.gemm_tile(1000, 300, 700, torch.float16, 132) == other_dtype  # a class the table lacks
        assert tiles.attention_forward_tile(40, 64, 64, torch.float16) == AttentionTile(64, 32, 4, 2)
        assert tiles.attention_backward_tile(64, 64, torch.float16) == AttentionTile(32, 64, 8, 1)
        with tiles.override("gemm", lambda *args: GemmTile(16, 16, 16, 4, 1, 1)):
            assert tiles.gemm_tile(1000, 300, 700, torch.bfloat16, 132).block_m == 16  # an override beats the table
    assert tiles.gemm_tile(1000, 300, 700, torch.bfloat16, 132) == default and not tiles.overridden()


def test_a_gpu_models_committed_table_is_found_by_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(tiles, "TUNED_DIR", str(tmp_path))
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(_table({"gemm": {"bfloat16/m16/n32/k16": WIDE}})))
    table = tiles.load_table("NVIDIA H200")
    assert table.tile("gemm", "bfloat16/m16/n32/k16") == WIDE and table.tile("gemm", "bfloat16/m32/n32/k16") is None
    assert tiles.load_table("NVIDIA H100 80GB HBM3") is None


def test_a_malformed_table_is_refused_when_it_is_read():
    with pytest.raises(TypeError):
        tiles.TunedTable({"families": {"gemm": {"bfloat16/m16/n16": {"tile": {"block_m": 16}}}}})
    with pytest.raises(ValueError, match="unknown family 'conv'"):
        tiles.TunedTable({"families": {"conv": {}}})


def test_the_sweep_refuses_a_cpu_without_the_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(_config, "TRITON_ON_CPU", False)
    with pytest.raises(SystemExit):
        tune.main(["--device", "cpu"])
    assert "MMKERN_TRITON_INTERPRET=1" in capsys.readouterr().err


def _tiny_suites():
    by_op = {s.op: s for s in suites()}
    return [
        dataclasses.replace(
            by_op["concat_linear"], cases=lambda preset, device: {"tiny": ([(2, 8, 16), (2, 1, 8)], 16, "gelu")}
        ),
        dataclasses.replace(
            by_op["cross_modal_attention"],
            cases=lambda preset, device: {"tiny": (2, 8, 12, 2, 1, 16, 16, 0.7, {"causal": True})},
        ),
    ]


@interpreter_only
def test_the_plan_finds_every_familys_shape_classes():
    targets = tune.plan(_tiny_suites(), [torch.float32], torch.device("cpu"), "full")
    assert {(t.family, t.key, t.mode) for t in targets} == {
        ("gemm", "float32/m16/n16/k16", "forward"),
        ("attention_forward", "float32/q16/d16/dv16", "forward"),
        ("attention_backward", "float32/d16/dv16", "forward+backward"),
        ("attention_backward_kv", "float32/d16/dv16", "forward+backward"),
    }
    for target in targets:
        tile_list = tune.candidates(target)
        assert tile_list[0] == tune._default(target) and len(set(tile_list)) == len(tile_list) > 1


@interpreter_only
def test_candidates_that_fail_or_disagree_are_dropped_and_the_rest_timed():
    concat = _tiny_suites()[0]

    def providers(case, options):
        def wrong_for_block_32(xs, w, b):
            out = ops.concat_linear(xs, w, b, activation="gelu")
            # The tile this call's class was forced to: a candidate whose answer is off.
            return out + 1 if tiles.gemm_tile(16, 16, 16, torch.float32, 1).block_m == 32 else out

        return {
            "mmkern": wrong_for_block_32,
            "eager": lambda xs, w, b: reference.concat_linear(xs, w, b, activation="gelu"),
        }

    target = tune.plan(
        [dataclasses.replace(concat, make_providers=providers)], [torch.float32], torch.device("cpu"), "full"
    )[0]
    broken = GemmTile(24, 16, 16, 4, 1, 1)  # tl.arange takes powers of 2 only: it cannot compile
    kept, dropped = tune.checked(
        target, [tune._default(target), GemmTile(32, 32, 16, 4, 1, 1), broken], torch.device("cpu")
    )
    assert kept == [tune._default(target)]
    assert "disagrees with the reference" in dropped[GemmTile(32, 32, 16, 4, 1, 1)]
    assert dropped[broken].startswith("fails:")
    # Past its deadline a class tries its default alone (each candidate is a compile).
    assert tune.checked(target, [tune._default(target), broken], torch.device("cpu"), deadline=0.0) == (kept, {})
    medians = tune.timed(target, kept, torch.device("cpu"), repeats=3, budget_s=1.0)
    assert list(medians) == kept and medians[kept[0]] > 0


@interpreter_only
def test_the_command_writes_a_table_the_tiles_then_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "suites", _tiny_suites)
    # The interpreter's timings are noise: the second candidate of each class is made the faster.
    monkeypatch.setattr(
        tune,
        "timed",
        lambda target, tile_list, *args, **kwargs: {tile: 1.0 if tile == tile_list[0] else 0.5 for tile in tile_list},
    )
    out = tmp_path / "table.json"
    assert (
        tune.main(["--device", "cpu", "--dtype", "float32", "--budget", "60", "--repeats", "3", "--out", str(out)]) == 0
    )
    table = json.loads(out.read_text())
    tuned = table["families"]
    assert {family: set(entries) for family, entries in tuned.items()} == {
        "gemm": {"float32/m16/n16/k16"},
        "attention_forward": {"float32/q16/d16/dv16"},
        "attention_backward": {"float32/d16/dv16"},
        "attention_backward_kv": {"float32/d16/dv16"},
    }
    entry = tuned["gemm"]["float32/m16/n16/k16"]
    assert entry["tile"] != entry["default"] and entry["timed"] == entry["candidates"] == 2
    assert (entry["median_ms"], entry["default_ms"]) == (0.5, 1.0) and table["kept_default"] == {}
    assert table["left_out"] == [] and table["environment"]["torch"] == torch.__version__
    # Read back, the table sends the op's launch to its tile, with the same answer.
    chosen = []
    original = tiles._chosen
    monkeypatch.setattr(tiles, "_chosen", lambda *args: chosen.append(original(*args)) or chosen[-1])
    xs = [torch.randn(2, 8, 16), torch.randn(2, 1, 8)]
    weight, bias = torch.randn(16, 24), torch.randn(16)
    with tiles.use_table(table):
        out = ops.concat_linear(xs, weight, bias, activation="gelu")
    assert GemmTile(**entry["tile"]) in chosen
    torch.testing.assert_close(out, reference.concat_linear(xs, weight, bias, activation="gelu"))


@interpreter_only
def test_a_spent_budget_leaves_the_remaining_classes_untuned():
    targets = tune.plan(_tiny_suites(), [torch.float32], torch.device("cpu"), "full")
    table = tune.sweep(targets, torch.device("cpu"), budget_s=0.0, log=lambda line: None)
    assert len(table["left_out"]) == len(targets) and not any(table["families"].values())
