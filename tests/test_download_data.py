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
    # The R1 data as its hub repository holds it: one JSON file whose columns name the API fields.
    r1 = [
        {
            "question": "What causes scurvy?",
            "reasoning (reasoning_content)": "Okay, collagen needs vitamin C...",
            "response (content)": "Vitamin C deficiency.",
        },
        {
            "question": "Dropped?",
            "reasoning (reasoning_content)": "",
            "response (content)": "empty reasoning",
        },
    ]
    (mirror / "Medical-R1-Distill-Data").mkdir()
    (mirror / "Medical-R1-Distill-Data" / "medical_r1_distill.json").write_text(json.dumps(r1))
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
    r1_sft = json.loads((out / "medical_r1_distill_sft.json").read_text())
    assert r1_sft == [
        {
            "Question": "What causes scurvy?",
            "Complex_CoT": "Okay, collagen needs vitamin C...",
            "Response": "Vitamin C deficiency.",
        }
    ]
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


def test_r1_data_with_unknown_columns_names_the_expected_ones(tmp_path):
    folder = tmp_path / "mirror" / "FreedomIntelligence" / "Medical-R1-Distill-Data"
    folder.mkdir(parents=True)
    (folder / "data.json").write_text(json.dumps([{"question": "q", "think": "t", "answer": "a"}]))
    result = subprocess.run(
        [sys.executable, "download_data.py", "--out_dir", str(tmp_path / "data"), "--mirror", str(tmp_path / "mirror"),
         "--skip_verifiable", "--sft_configs"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no column for Complex_CoT (one of 'reasoning (reasoning_content)'" in result.stderr
    assert "Response (one of 'response (content)'" in result.stderr and "'think'" in result.stderr
