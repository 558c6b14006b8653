"""The papermill chain on tiny notebooks: parameter merging, unknown names, failures, resume."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import nbformat
import pytest

from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.pipeline.cli import add_arguments
from dfd_lib.pipeline.parameters import ParameterError, merge_parameters, parse_overrides
from dfd_lib.pipeline.steps import PipelineError, discover_steps, select_steps


def _notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def chain(tmp_path):
    notebooks, pipelines, reports = tmp_path / "notebooks", tmp_path / "pipelines", tmp_path / "reports"
    notebooks.mkdir(), pipelines.mkdir()
    _notebook(notebooks / "01_make.ipynb",
              'run_dir: str = ""  # run folder\nsize: int = 1  # items\nscale: float = 1.0  # factor',
              "import json, pathlib\npathlib.Path(run_dir, 'made.json').write_text(json.dumps({'size': size, 'scale': scale}))")
    _notebook(notebooks / "02_use.ipynb",
              'run_dir: str = ""  # run folder\nsize: int = 1  # items\nfail: bool = False  # raise on purpose',
              "import json, pathlib\nmade = json.loads(pathlib.Path(run_dir, 'made.json').read_text())\n"
              "import os\nassert not os.environ.get('TINY_FAIL_ONCE'), 'a passing failure'\n"
              "assert not fail, 'asked to fail'\npathlib.Path(run_dir, 'used.json').write_text(json.dumps({**made, 'size2': size}))")
    (pipelines / "tiny.yaml").write_text("description: test\nparams:\n  size: 3\nsteps:\n  01_make:\n    scale: 2.5\n")
    (pipelines / "other.yaml").write_text("description: another profile\n")
    return dict(notebooks_dir=notebooks, pipelines_dir=pipelines, reports_dir=reports)


def test_parameters_merge_by_precedence(chain):
    steps = discover_steps(chain["notebooks_dir"])
    declared = {"01_make": {"run_dir": {}, "size": {}, "scale": {}}, "02_use": {"run_dir": {}, "size": {}, "fail": {}}}
    profile = {"params": {"size": 3}, "steps": {"01_make": {"scale": 2.5}}}
    merged = merge_parameters(steps, profile, parse_overrides(["size=5", "02.fail=true"]), declared)
    assert merged == {"01_make": {"size": 5, "scale": 2.5}, "02_use": {"size": 5, "fail": True}}
    with pytest.raises(ParameterError, match="declared by none"):
        merge_parameters(steps, profile, {"epochs": 3}, declared)
    with pytest.raises(ParameterError, match="declares no parameter"):
        merge_parameters(steps, profile, {"01.fail": True}, declared)
    with pytest.raises(ParameterError, match="declared by no notebook"):
        merge_parameters(steps, {"params": {"typo": 1}}, {}, declared)
    assert [s.key for s in select_steps(steps, only="02")] == ["02"]
    assert [s.key for s in select_steps(steps, start="01")] == ["01", "02"]
    with pytest.raises(PipelineError, match="unknown step"):
        select_steps(steps, only="07")


@pytest.mark.slow
def test_chain_runs_records_and_resumes_after_failure(chain):
    result = run_pipeline("tiny", run="r1", overrides={"02.fail": True}, progress=False, **chain)
    run_dir = result.run_dir
    assert [s.status for s in result.steps] == ["ok", "failed"]
    assert "asked to fail" in result.steps[1].error
    made = json.loads((run_dir / "made.json").read_text())
    assert made == {"size": 3, "scale": 2.5}
    assert not (run_dir / "used.json").exists()
    assert (run_dir / "notebooks" / "02_use.ipynb").is_file()  # the failed notebook is kept for reading
    before = (run_dir / "made.json").stat().st_mtime_ns

    assert result.resume == "dfd pipeline --run r1 --from 02"
    resumed = run_pipeline("tiny", run="r1", start="02", overrides={"02.fail": "false"}, progress=False, **chain)
    assert [s.step for s in resumed.steps] == ["02_use"] and resumed.ok
    assert json.loads((run_dir / "used.json").read_text()) == {**made, "size2": 3}
    assert (run_dir / "made.json").stat().st_mtime_ns == before  # earlier artefacts untouched
    params = json.loads((run_dir / "params.json").read_text())
    assert params["steps"]["01_make"]["size"] == 3 and params["steps"]["02_use"]["run_dir"] == str(run_dir)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"] and "device" in env
    executed = (run_dir / "notebooks" / "01_make.ipynb").read_text()
    assert "injected-parameters" in executed
    report = (run_dir / "index.html").read_text()
    assert "01_make" in report and "02_use" in report and "notebooks/01_make.html" in report
    assert "<h3>Environment</h3>" in report and "dfd rerun reports/r1 --run NEW" in report
    assert (run_dir / "notebooks" / "01_make.html").is_file()


def test_unknown_parameter_stops_before_running(chain):
    with pytest.raises(PipelineError, match="declared by none"):
        run_pipeline("tiny", run="r2", overrides={"epochs": 2}, progress=False, **chain)
    assert not (chain["reports_dir"] / "r2").exists()
    with pytest.raises(PipelineError, match="not found"):
        run_pipeline("nope", progress=False, **chain)


def test_prepare_only_injects_without_executing(chain):
    result = run_pipeline("tiny", run="dry", prepare_only=True, progress=False, **chain)
    assert [s.status for s in result.steps] == ["prepared", "prepared"]
    assert not (result.run_dir / "made.json").exists()
    assert "injected-parameters" in (result.run_dir / "notebooks" / "02_use.ipynb").read_text()


def _resume_args(command: str) -> argparse.Namespace:
    """``command`` (a printed ``dfd pipeline ...`` line) parsed as the dfd command parses it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = shlex.split(command)
    assert words[:2] == ["dfd", "pipeline"]
    return parser.parse_args(words[2:])


@pytest.mark.slow
def test_printed_resume_command_reuses_the_recorded_profile_and_overrides(chain, monkeypatch):
    # the first command: a profile, -p for both steps; step 02 dies of a passing cause (a flag in the environment)
    first = ["size=5", "scale=4"]
    monkeypatch.setenv("TINY_FAIL_ONCE", "1")
    failed = run_pipeline("tiny", run="r3", overrides=parse_overrides(first), progress=False, **chain)
    assert [s.status for s in failed.steps] == ["ok", "failed"] and failed.resume
    monkeypatch.delenv("TINY_FAIL_ONCE")
    args = _resume_args(failed.resume)
    assert args.profile is None and args.param == []  # nothing to retype
    resumed = run_pipeline(args.profile, only=args.only, start=args.start, run=args.run,
                           overrides=parse_overrides(args.param), progress=False, **chain)
    assert resumed.ok and [s.step for s in resumed.steps] == ["02_use"]
    uninterrupted = run_pipeline("tiny", run="r4", overrides=parse_overrides(first), progress=False, **chain)
    for name in ("made.json", "used.json"):
        assert (resumed.run_dir / name).read_text() == (uninterrupted.run_dir / name).read_text()
    record = json.loads((resumed.run_dir / "params.json").read_text())
    assert record["profile"] == "tiny" and record["overrides"] == {"size": "5", "scale": "4"}
    assert record["steps"]["02_use"]["size"] == 5

    # repeating the first command with --from 02 works: its values equal what 01 ran with
    again = run_pipeline("tiny", run="r3", start="02", overrides=parse_overrides(first), progress=False, **chain)
    assert again.ok
    # a change that would reach 02 but not the 01 that already ran is refused, with the way out
    with pytest.raises(PipelineError, match="differs from the value step 01_make ran with"):
        run_pipeline(run="r3", start="02", overrides=parse_overrides(["size=6"]), progress=False, **chain)
    changed = run_pipeline(run="r3", start="02", overrides=parse_overrides(["02.size=6"]), progress=False, **chain)
    assert changed.ok and json.loads((changed.run_dir / "params.json").read_text())["overrides"]["02.size"] == "6"
    with pytest.raises(PipelineError, match="profile"):
        run_pipeline("other", run="r3", start="02", progress=False, **chain)


def test_the_kernels_own_log_stays_out_of_the_terminal(chain, capfd):
    # what jupyter_client's shutdown interrupt makes a kernel log between steps, written by the kernel itself
    noisy = chain["notebooks_dir"].parent / "noisy"
    noisy.mkdir()
    _notebook(noisy / "01_make.ipynb", 'run_dir: str = ""  # run folder',
              "from ipykernel.kernelapp import IPKernelApp\nIPKernelApp.instance().log.error('KeyboardInterrupt caught in kernel.')\n"
              "import logging\nlogging.getLogger('asyncio').error('Task was destroyed but it is pending!')\n"
              "import sys\nprint('a line of the notebook', file=sys.stderr)")
    result = run_pipeline("other", run="quiet", progress=True, write_report=False, **{**chain, "notebooks_dir": noisy})
    assert result.ok, result.steps
    err = capfd.readouterr().err
    assert "a line of the notebook" in err  # the step's own output still reaches the terminal
    assert "KeyboardInterrupt caught in kernel" not in err and "[IPKernelApp]" not in err
    assert "Task was destroyed" not in err  # what the same interrupt makes asyncio log as the kernel exits


@pytest.mark.slow
def test_rerun_replays_the_recorded_values_with_new_ones_for_any_step(chain, caplog):
    from dfd_lib.pipeline.rerun import rerun

    first = run_pipeline("tiny", run="r5", progress=False, write_report=False, **chain)
    assert first.ok
    profile = chain["pipelines_dir"] / "tiny.yaml"
    profile.write_text(profile.read_text().replace("size: 3", "size: 4"))  # edited after the run
    with caplog.at_level("WARNING", logger="dfd_lib"):
        again = rerun(first.run_dir, "r6", overrides={"02.size": "7"}, progress=False, write_report=False, check=False, **chain)
    assert again.ok and [s.step for s in again.steps] == ["01_make", "02_use"]
    assert "01_make would now run with size=4 (recorded 3)" in caplog.text
    assert json.loads((again.run_dir / "used.json").read_text()) == {"size": 3, "scale": 2.5, "size2": 7}
