"""The run configuration: one frozen RunConfig, one default per option, built from the command
line or a run's run.json; the gate's units in --help and warnings; the package's import graph."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from verifier.cli import build_parser, main
from verifier.engine import decide
from verifier.errors import InputError
from verifier.run import check, config
from verifier.run.config import DEFAULTS, RunConfig, Settings, build_config, gate_warnings

ROOT = Path(__file__).resolve().parent.parent


def test_one_default_per_option():
    assert check.Settings is Settings
    st = DEFAULTS.settings(DEFAULTS.radius[0], DEFAULTS.step[0])
    assert st == Settings()  # the run's defaults are the settings' defaults
    assert inspect.signature(decide.decide).parameters["timeout"].default is inspect._empty
    assert vars(build_parser().parse_args([])) == {"model": None}  # argparse holds no defaults


def test_config_is_frozen_and_built_from_given_options():
    cfg = build_config({"model": Path("m.onnx"), "timeout": 5.0, "radius": [1, 2], "no_smt": True})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.timeout = 1.0  # type: ignore[misc]
    assert [s.radius for s in cfg.sweep()] == [1, 2]
    assert {s.timeout for s in cfg.sweep()} == {5.0} and not cfg.use_smt
    assert cfg.limit is None
    assert build_config({}).limit == config.DEFAULT_EXAMPLE_LIMIT  # the embedded example
    with pytest.raises(InputError, match="--timeout must be positive"):
        build_config({"model": Path("m.onnx"), "timeout": 0.0})


def test_quantized_models_take_their_own_budget_or_the_timeout():
    cfg = build_config({"model": Path("m.onnx"), "timeout": 5.0})
    assert {s.quantized_budget for s in cfg.sweep()} == {5.0}
    cfg = build_config({"model": Path("m.onnx"), "timeout": 5.0, "quantized_timeout": 9.0})
    assert {(s.timeout, s.quantized_budget) for s in cfg.sweep()} == {(5.0, 9.0)}
    assert cfg.stored()["quantized_timeout"] == 9.0  # it changes decisions: a run keeps it
    with pytest.raises(InputError, match="--quantized-timeout must be positive"):
        build_config({"model": Path("m.onnx"), "quantized_timeout": -1.0})


def test_resume_takes_the_stored_options_and_keeps_given_output_options(tmp_path):
    first = build_config({"model": Path("m.onnx"), "timeout": 7.0, "step": [1 / 64]})
    (tmp_path / "run.json").write_text(json.dumps(first.stored()))
    again = build_config({"resume": tmp_path, "workers": 3})
    assert again.stored() == first.stored()
    assert again.workers == 3 and again.out == tmp_path
    with pytest.raises(InputError, match="continues RUN in place"):
        build_config({"resume": tmp_path, "out": tmp_path / "other"})


def test_stored_config_names_only_decision_options():
    keys = set(RunConfig(model=Path("m.onnx")).stored())
    assert not keys & set(config.OUTPUT_OPTIONS)
    assert {"timeout", "radius", "step", "use_smt", "seed", "model"} <= keys


def test_help_names_units_and_shows_each_default_once(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert not any(part.count("(default:") > 1 for part in text.split(" --"))
    assert "Thresholds are percentages from 0 to 100" in text
    assert "minimum is checked against lo and a maximum against hi" in text
    assert "below PCT percent" in text


def test_min_threshold_of_at_most_one_warns_that_it_is_percent(capsys, tmp_path):
    assert gate_warnings(RunConfig(min_accuracy=90, min_relative_robustness=50)) == []
    assert gate_warnings(RunConfig(max_transfer=1)) == []  # a maximum of 1% is plausible
    lines = gate_warnings(RunConfig(min_accuracy=1.0, min_relative_robustness=0.95))
    assert len(lines) == 2 and "--min-accuracy 1 means 1%" in lines[1]
    main([str(tmp_path / "missing.onnx"), "--min-accuracy", "1.0"])
    err = capsys.readouterr().err.splitlines()
    assert any("--min-accuracy 1 means 1%" in line for line in err)


PACKAGES = ("verifier", "verifier.engine", "verifier.run", "verifier.outputs", "quantize")


def _modules() -> list:
    return [f for pkg in ("verifier", "quantize") for f in sorted((ROOT / pkg).rglob("*.py"))]


def _module_name(f) -> str:
    return ".".join(f.relative_to(ROOT).with_suffix("").parts)


def _imports() -> nx.DiGraph:
    graph = nx.DiGraph()
    for f in _modules():
        mod = _module_name(f)
        graph.add_node(mod)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                graph.add_edges_from((mod, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                target = node.module
                if target in PACKAGES:
                    target += ".__init__"
                graph.add_edge(mod, target)
    return graph


def test_no_import_cycle_and_argparse_only_in_commands():
    graph = _imports()
    ours = graph.subgraph(n for n in graph if n.split(".")[0] in ("verifier", "quantize"))
    assert list(nx.simple_cycles(ours)) == []
    commands = {"verifier.cli", "quantize.cli", "verifier.show", "verifier.audit"}
    assert set(graph.predecessors("argparse")) <= commands


def test_imports_flow_one_way_engine_run_outputs():
    """The engine uses no run or output code, the run no output code, quantize no run code."""
    graph = _imports()
    above = {
        "verifier.engine": ("verifier.run", "verifier.outputs", "quantize", "verifier.cli"),
        "verifier.run": ("verifier.outputs", "verifier.cli", "verifier.pipeline"),
        "quantize": ("verifier.run", "verifier.outputs", "verifier.pipeline"),
    }
    wrong = [
        (a, b)
        for a, b in graph.edges
        for pkg, banned in above.items()
        if a.startswith(pkg + ".") and b.startswith(banned)
    ]
    assert wrong == []
    assert len([n for n in graph if n.startswith("verifier.engine.")]) > 20


def test_one_point_counter_and_evaluator_and_search_without_z3():
    graph = _imports()
    defined = {
        _module_name(f): {
            n.name for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.FunctionDef)
        }
        for f in _modules()
    }
    assert "verifier.engine.points" in defined
    for name in ("count_points", "box_size", "runtime_inputs", "predict_points", "region_inputs"):
        assert [m for m, names in defined.items() if name in names] in (
            [],
            ["verifier.engine.points"],
        )
    code = "import sys, verifier.engine.search, verifier.engine.ladders; print('z3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
    assert "verifier.engine.smt" not in nx.descendants(graph, "verifier.engine.search")


def test_help_prints_percent_signs_once(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "90 means 90%," in text and "%%" not in text


def test_the_embedded_default_model_is_found():
    """The README's main command (`verify` with no model) runs the committed example."""
    from verifier.run.config import DEFAULT_MODEL

    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.parent == ROOT / "examples"
