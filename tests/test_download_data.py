import json
import subprocess
import sys

import datasets

from tests.conftest import ROOT


def test_download_converts_a_local_mirror(tmp_path, tiny_models):
    mirror = tmp_path / "mirror" / "FreedomIntelligence"
    datasets.Dataset.from_list(
        [
            {
                "Open-ended Verifiable Question": "What causes scurvy?",
                "Ground-True Answer": "Vitamin C deficiency",
            },
            {"Open-ended Verifiable Question": "", "Ground-True Answer": "dropped, empty question"},
        ]
    ).save_to_disk(mirror / "medical-o1-verifiable-problem")
    datasets.Dataset.from_list(
        [{"Question": "Q", "Complex_CoT": "Hmm, think.", "Response": "R", "extra": 1}]
    ).save_to_disk(mirror / "medical-o1-reasoning-SFT" / "en")
    (mirror / "tiny-verifier").parent.mkdir(exist_ok=True)
    subprocess.run(["cp", "-r", str(tiny_models["verifier"]), str(mirror / "tiny-verifier")], check=True)

    out = tmp_path / "data"
    result = subprocess.run(
        [
            sys.executable,
            "download_data.py",
            "--out_dir",
            str(out),
            "--mirror",
            str(tmp_path / "mirror"),
            "--models",
            "FreedomIntelligence/tiny-verifier",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    problems = json.loads((out / "medical_o1_verifiable_problem.json").read_text())
    assert problems == [
        {
            "Open-ended Verifiable Question": "What causes scurvy?",
            "Ground-True Answer": "Vitamin C deficiency",
        }
    ]
    sft = json.loads((out / "medical_o1_sft_en.json").read_text())
    assert sft == [{"Question": "Q", "Complex_CoT": "Hmm, think.", "Response": "R"}]
    assert (out / "models" / "tiny-verifier" / "config.json").exists()


def test_download_names_a_missing_mirror_entry(tmp_path):
    result = subprocess.run(
        [sys.executable, "download_data.py", "--out_dir", str(tmp_path), "--mirror", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "medical-o1-verifiable-problem" in result.stderr and "not in the mirror" in result.stderr
