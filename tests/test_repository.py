import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick_start = text[text.index("## Quick start"): text.index("## Python API")]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, test_suite = commands
    assert main_job.endswith("nsn-quickstart") and "torch==2.13.0" in main_job
    assert test_suite.endswith("python -m pytest") and "torch==2.13.0" in test_suite
    assert test_suite in (ROOT / ".ci" / "run").read_text()


def test_top_level_layout_matches_the_design():
    for name in ("nsn_export", "deploy", "calibration", "tests", "scripts", "pyproject.toml"):
        assert (ROOT / name).exists(), name


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.+?)```", text, re.S) if not b.startswith("# needs")]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "readme-onnx" / "model.onnx").is_file()
