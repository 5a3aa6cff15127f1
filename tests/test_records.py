"""Every records folder holds the code its logs were produced by, and runs by itself."""

import json
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
    sub = json.loads((folder / "submission.json").read_text())
    code = sum((folder / n).stat().st_size for n in CODE_NAMES)
    assert sub["bytes_code"] == code and sub["bytes_total"] == sub["bytes_model"] + code <= 16_000_000
    run = json.loads((folder / f"{sub['run_id']}.json").read_text())
    assert run["roundtrip_val_bpb"] == pytest.approx(sub["val_bpb"], abs=1e-8) and run["total_bytes"] == sub["bytes_total"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_folder_imports_its_sibling_module_by_itself(folder):
    code = "import train_gpt, triton_kv_ops; print(triton_kv_ops.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert out.stdout.strip().startswith(str(folder))
