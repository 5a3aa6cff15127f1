"""Every records folder holds the code its logs were produced by, and runs by itself."""

import json
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT

CODE_NAMES = tuple(p.name for p in tg.CODE_FILES)  # the files a submission counts and its logs record

FOLDERS = sorted(p.parent for p in ROOT.glob("records/*/*/train_gpt.py"))


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_code_is_the_source_recorded_in_its_logs(folder):
    logs = sorted(folder.glob("*.log"))
    assert logs, f"{folder} has no train logs"
    for log in logs:
        text = log.read_text(encoding="utf-8")
        for name in CODE_NAMES:
            recorded = text.split(f"==> {name} <==\n", 1)[1]
            assert recorded.startswith((folder / name).read_text(encoding="utf-8")), f"{log.name}: {name} differs"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_submission_json_matches_its_run(folder):
    """val_bpb is the run's scored eval: the AR eval's scored line where the run has one, else the roundtrip."""
    sub = json.loads((folder / "submission.json").read_text())
    code = sum((folder / n).stat().st_size for n in CODE_NAMES)
    assert sub["bytes_code"] == code and sub["bytes_total"] == sub["bytes_model"] + code <= 16_000_000
    run = json.loads((folder / f"{sub['run_id']}.json").read_text())
    scored = run.get("ar_eval", {}).get("scored", {}).get("val_bpb", run["roundtrip_val_bpb"])
    assert scored == pytest.approx(sub["val_bpb"], abs=1e-8) and run["total_bytes"] == sub["bytes_total"]
    assert run["pre_roundtrip_val_bpb"] == pytest.approx(sub["pre_quant_val_bpb"], abs=1e-8)


NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def readme_figures(text: str) -> list[str]:
    """The numbers of a README's prose and tables: not in code (fenced or inline), dates or names (int8, H200)."""
    text = re.sub(r"```.*?```|`[^`]*`|\d{4}-\d{2}-\d{2}\w*", " ", text, flags=re.S)
    return [m.group() for m in NUMBER.finditer(text)
            if not (m.start() and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "_.")) and
            not (m.end() < len(text) and (text[m.end()].isalnum() or text[m.end()] == "_"))]


def recorded_numbers(folder) -> dict[int, set[str]]:
    """Every number of the folder's logs and JSON files, as it reads at 0..8 decimals."""
    found = set()
    for path in [*folder.glob("*.log"), *folder.glob("*.json")]:
        found.update(float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", path.read_text(encoding="utf-8")))
    return {d: {f"{x:.{d}f}" for x in found} for d in range(9)}


def unrecorded(figures: list[str], recorded: dict[int, set[str]]) -> list[str]:
    """The figures no recorded number reads as (thousands separators dropped, at the figure's decimals)."""
    return [f for f in figures if f.replace(",", "") not in recorded[len(f.partition(".")[2])]]


def test_readme_figure_check_catches_a_figure_no_log_holds(tmp_path):
    (tmp_path / "run.json").write_text('{"val_bpb": 1.2697406801996804, "bytes": 7949407, "tok_s": 543821.7}')
    recorded = recorded_numbers(tmp_path)
    figures = readme_figures("| polar | 1.26974 | 7,949,407 | 543,822 | int8 H200 `X=3` 2026-12-03 | 1.26975 | 0.675× |")
    assert figures == ["1.26974", "7,949,407", "543,822", "1.26975", "0.675"]
    assert unrecorded(figures, recorded) == ["1.26975", "0.675"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_every_readme_figure_is_in_a_log_or_json_file(folder):
    """A figure of the README, read as written (thousands separators dropped, at its decimals), is a number
    of one of the folder's logs or JSON files."""
    figures = readme_figures((folder / "README.md").read_text(encoding="utf-8"))
    missing = unrecorded(figures, recorded_numbers(folder))
    assert figures and not missing, f"figures in {folder.name}/README.md that no log or JSON holds: {missing}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_folder_imports_its_sibling_module_by_itself(folder):
    code = "import train_gpt, triton_kv_ops; print(triton_kv_ops.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert out.stdout.strip().startswith(str(folder))
