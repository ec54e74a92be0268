"""`tandem eplb plan`, `show` and `rebalance`: JSON round trip, re-planning with --previous, error messages
and exit codes, `show` against a real redis-server (statistics written by ExpertLoadRecorder), and `rebalance`
against a real controller."""

import argparse
import json
import uuid

import numpy as np
import pytest
import torch

from tandem.eplb.cli import add_eplb_parser
from tandem.eplb.planner import ClusterShape, plan_placement
from tandem.eplb.stats import ExpertLoadRecorder, connect

LOAD = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
SHAPE = ["--servers", "8", "--slots-per-server", "2", "--nodes", "2", "--groups", "4"]


def eplb(*argv: str) -> int:
    """Run `tandem eplb ...` as the lead's parser will: `add_eplb_parser` under a `tandem` parser."""
    parser = argparse.ArgumentParser(prog="tandem")
    add_eplb_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eplb", *argv])
    return args.func(args)


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_plan_json_round_trip_and_previous(tmp_path, capsys):
    load = write(tmp_path / "load.json", {"load": LOAD})
    assert eplb("plan", "--load", load, *SHAPE, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) == {"phy2log", "logcnt", "balancedness", "moved"}
    expected = plan_placement(LOAD, ClusterShape(8, 2, 2, 4))
    assert plan["phy2log"] == expected.phy2log.tolist()
    assert plan["logcnt"] == expected.logcnt.tolist()
    assert plan["moved"] == [0, 0]
    assert plan["balancedness"] == pytest.approx(expected.balancedness.tolist(), abs=1e-6)

    previous = write(tmp_path / "plan.json", plan)  # --previous reads what --json wrote
    assert eplb("plan", "--load", load, *SHAPE, "--previous", previous, "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["moved"] == [0, 0] and again["phy2log"] == plan["phy2log"]

    skewed = write(tmp_path / "skewed.json", {"load": [LOAD[1], LOAD[0]]})
    assert eplb("plan", "--load", skewed, *SHAPE, "--previous", previous, "--margin", "0.01", "--json") == 0
    moved = json.loads(capsys.readouterr().out)
    assert all(m >= 0 for m in moved["moved"]) and len(moved["phy2log"]) == 2


def test_plan_prints_a_readable_summary(tmp_path, capsys):
    load = write(tmp_path / "load.json", {"load": LOAD})
    assert eplb("plan", "--load", load, *SHAPE) == 0
    out = capsys.readouterr().out
    assert "policy hierarchical" in out and "16 physical, 4 redundant" in out
    assert "balancedness" in out and " mean " in out
    assert eplb("plan", "--load", load, *SHAPE, "--policy", "global") == 0
    assert "policy global" in capsys.readouterr().out


@pytest.mark.parametrize("load, flags, message", [
    ({"load": LOAD}, ["--servers", "4", "--slots-per-server", "2"], "fewer than the 12 logical experts"),
    ({"load": LOAD}, ["--servers", "8", "--slots-per-server", "2", "--groups", "5"], "5 expert groups do not divide"),
    ({"load": LOAD}, ["--servers", "8", "--slots-per-server", "2", "--nodes", "3"], "cannot be spread evenly"),
    ({"load": LOAD}, [*SHAPE[:4], "--nodes", "4", "--groups", "6", "--policy", "hierarchical"], "multiple of the nodes"),
    ({"load": [[1, -1] + [1] * 10]}, SHAPE, "loads must be >= 0"),
    ({"load": [[1] * 12, [1] * 11]}, SHAPE, "ragged layers"),
    ({"loads": LOAD}, SHAPE, 'expected a JSON object with "load"'),
    ({"load": LOAD}, [*SHAPE, "--margin", "-0.5"], "margin must be in"),
])
def test_plan_bad_input_exits_2_with_a_message(tmp_path, capsys, load, flags, message):
    path = write(tmp_path / "load.json", load)
    assert eplb("plan", "--load", path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("tandem eplb plan: error:")


def test_plan_bad_files_exit_2(tmp_path, capsys):
    load = write(tmp_path / "load.json", {"load": LOAD})
    assert eplb("plan", "--load", str(tmp_path / "missing.json"), *SHAPE) == 2
    assert "missing.json: cannot read it" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert eplb("plan", "--load", str(tmp_path / "broken.json"), *SHAPE) == 2
    assert "not valid JSON" in capsys.readouterr().err
    wrong = write(tmp_path / "wrong.json", {"phy2log": [[0, 1, 2]] * 2})
    assert eplb("plan", "--load", load, *SHAPE, "--previous", wrong) == 2
    assert "previous placement has shape [2, 3]" in capsys.readouterr().err
    missing = write(tmp_path / "missing_expert.json", {"phy2log": [[0] * 16, list(range(12)) + [0] * 4]})
    assert eplb("plan", "--load", load, *SHAPE, "--previous", missing) == 2
    assert "layer 0 has no copy of expert 1" in capsys.readouterr().err


# --- show, against a real redis-server -------------------------------------------------------------------

def record(url: str, model: str, load) -> None:
    recorder = ExpertLoadRecorder(connect(url), model, window_s=3600.0)  # show sums the newest windows
    for layer, counts in enumerate(load):
        recorder.add(layer, torch.tensor(counts))
    assert recorder.flush()


def test_show_prints_balancedness_and_plots(redis_server, tmp_path, capsys):
    model = f"eplb-show-{uuid.uuid4().hex[:8]}"
    record(redis_server, model, LOAD)
    plot = tmp_path / "heat.png"
    assert eplb("show", "--redis-url", redis_server, "--model", model, *SHAPE, "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    assert f"model {model}: 2 MoE layers x 12 experts, {int(np.sum(LOAD))} tokens" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2
    planned = plan_placement(LOAD, ClusterShape(8, 2, 2, 4)).balancedness
    for row, expected in zip(rows, planned):
        assert float(row[2]) == pytest.approx(expected, abs=1e-4)
        assert float(row[1]) <= float(row[2])  # the static placement is no better here
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # against a previous plan: that plan's balancedness now, and the experts a re-plan moves
    previous = write(tmp_path / "plan.json", plan_placement(LOAD, ClusterShape(8, 2, 2, 4)).to_json())
    assert eplb("show", "--redis-url", redis_server, "--model", model, *SHAPE, "--previous", previous) == 0
    out = capsys.readouterr().out
    assert "previous" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert all(row[1] == row[2] and row[3] == "0" for row in rows)


def test_show_without_statistics_or_redis(redis_server, capsys):
    from conftest import free_port

    assert eplb("show", "--redis-url", redis_server, "--model", f"nothing-{uuid.uuid4().hex[:8]}", *SHAPE) == 1
    assert "no expert-load statistics for model" in capsys.readouterr().err
    dead = f"redis://127.0.0.1:{free_port()}/0"
    assert eplb("show", "--redis-url", dead, "--model", "m", *SHAPE) == 1
    err = capsys.readouterr().err
    assert "is unavailable" in err and "Traceback" not in err


def test_show_bad_input_exits_2(redis_server, tmp_path, capsys):
    model = f"eplb-bad-{uuid.uuid4().hex[:8]}"
    record(redis_server, model, LOAD)
    assert eplb("show", "--redis-url", redis_server, "--model", model, "--servers", "2",
                "--slots-per-server", "2") == 2
    assert "fewer than the 12 logical experts" in capsys.readouterr().err
    assert eplb("show", "--redis-url", redis_server, "--model", model, *SHAPE, "--num-layers", "1",
                "--num-experts", "12") == 2
    assert "outside 1 MoE layers" in capsys.readouterr().err
    assert eplb("show", "--redis-url", redis_server, "--model", model, *SHAPE, "--decay", "0") == 2
    assert "--decay in (0, 1]" in capsys.readouterr().err
    assert eplb("show", "--redis-url", redis_server, "--model", model, *SHAPE,
                "--plot", str(tmp_path / "no" / "such" / "dir.png")) == 2
    assert "dir.png" in capsys.readouterr().err


# --- rebalance, against a real controller ----------------------------------------------------------------

@pytest.fixture(scope="module")
def controllers(tmp_path_factory, redis_server):
    """Two controllers of the tiny model: one with load balancing (Redis, no statistics), one without."""
    from services.controller.server import ControllerServer
    from tandem.cluster.config import ControllerConfig
    from tandem.model.presets import preset_config

    model_dir = tmp_path_factory.mktemp("tiny-config")
    (model_dir / "config.json").write_text(json.dumps(preset_config("tiny").to_dict()))
    common = dict(model_dir=str(model_dir), host="127.0.0.1", port=0, store_port=0, grace_s=0.0)
    on = ControllerServer(ControllerConfig(**common, redis_url=redis_server,
                                           stats_model_name=f"cli-{uuid.uuid4().hex[:8]}")).start()
    off = ControllerServer(ControllerConfig(**common)).start()
    yield f"127.0.0.1:{on.port}", f"127.0.0.1:{off.port}"
    on.stop()
    off.stop()


def test_rebalance_prints_the_outcome(controllers, capsys):
    on, _ = controllers
    assert eplb("rebalance", "--controller", on) == 0
    captured = capsys.readouterr()
    assert captured.out == "not applied (no expert load recorded yet): placement version 1 keeps serving\n"
    assert captured.err == ""
    assert eplb("rebalance", "--controller", on, "--force", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "applied": False, "reason": "no expert load recorded yet", "placement_version": 1,
        "balancedness_before": 0.0, "balancedness_after": 0.0, "moved": 0}


def test_rebalance_errors_exit_1_with_the_status(controllers, capsys):
    from conftest import free_port
    from tandem.cli import main as tandem_main

    _, off = controllers
    assert tandem_main(["eplb", "rebalance", "--controller", off]) == 1  # through the real `tandem` parser
    err = capsys.readouterr().err
    assert err.startswith(f"tandem eplb rebalance: error: controller {off}: FAILED_PRECONDITION: ")
    assert "load balancing is off" in err and "Traceback" not in err
    nobody = f"127.0.0.1:{free_port()}"
    assert eplb("rebalance", "--controller", nobody, "--timeout-s", "5") == 1
    err = capsys.readouterr().err
    assert f"controller {nobody}: UNAVAILABLE: " in err and "Traceback" not in err
    assert eplb("rebalance", "--controller", off, "--timeout-s", "0") == 2
    assert "--timeout-s must be positive" in capsys.readouterr().err


def test_rebalance_outcome_lines():
    from tandem.eplb.cli import format_rebalance

    applied = {"applied": True, "reason": "applied", "placement_version": 3, "balancedness_before": 0.61234,
               "balancedness_after": 0.9, "moved": 5}
    assert format_rebalance(applied) == ("applied: placement version 3 now serving\n"
                                         "  balancedness 0.6123 -> 0.9000 (mean over MoE layers), 5 experts moved")
    small = applied | {"applied": False, "reason": "gain 0.0012 <= min_gain 0.01", "placement_version": 2}
    assert format_rebalance(small) == ("not applied (gain 0.0012 <= min_gain 0.01): placement version 2 keeps "
                                       "serving\n  balancedness 0.6123 -> 0.9000 (mean over MoE layers), 5 experts "
                                       "to move")
