"""The lmms-eval plugin: the real lmms-eval CLI gives exactly `nuwa-train eval --data`'s numbers on the same records,
lmms-eval's own refcoco_bbox_rec scorers read the plugin's LLaVA answers, and bad model arguments are clear errors.

lmms-eval is installed by `./launch.sh test` (requirements/lmms-eval.txt); CI must not skip these tests.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (./launch.sh test installs it)")

from nuwa_train.cli import main  # noqa: E402
from nuwa_train.data.boxes import ImageFrame, LlavaBox  # noqa: E402
from nuwa_train.harness import TASKS_DIR  # noqa: E402
from nuwa_train.pruning import NuwaConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_BASE = ROOT / "data" / "tiny_base"  # trained: its answers are mostly right, so the scores can disagree
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
IMAGES = 4  # 4 VQA + 4 grounding records: small for CI, both tasks and both settings


def _lmms_eval(model_args: str, tasks: str, out: Path, env: dict) -> dict:
    """Run `python -m lmms_eval` (the CLI users run); its results and per-record samples."""
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "nuwa",
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(TASKS_DIR),
        "--output_path",
        str(out),
        "--log_samples",
        "--batch_size",
        "4",
    ]
    done = subprocess.run(command, env={**os.environ, **OFFLINE, **env}, capture_output=True, text=True, timeout=600)
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-3000:]  # it exits 0 on errors too
    samples = {}
    for path in glob.glob(str(out / "**" / "*_samples_*.jsonl"), recursive=True):
        task = Path(path).stem.split("_samples_")[1]
        samples[task] = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {"results": json.loads(Path(results[0]).read_text())["results"], "samples": samples}


def test_lmms_eval_cli_gives_exactly_the_numbers_of_nuwa_train_eval_on_the_same_records(tmp_path):
    data = tmp_path / "synthetic"
    main(["export-data", str(data), "--format", "llava-refcoco", "--split", "test", "--images", str(IMAGES)])
    llava, refcoco = data / "llava_vqa.json", data / "refcoco_grounding.json"
    main(
        [
            "eval",
            "--model",
            str(SHIPPED_BASE),
            "--method",
            "nuwa",
            "--budget",
            "64",
            "--out",
            str(tmp_path / "ours"),
            "--data",
            f"llava={llava}",
            "--data",
            f"refcoco={refcoco}",
        ]
    )
    ours = {row["method"]: row for row in json.loads((tmp_path / "ours" / "results.json").read_text())["rows"]}
    predictions = {}
    for line in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        predictions.setdefault(record["setting"], []).append(record)
    env = {"NUWA_SYNTHETIC_DIR": str(data), "HF_HOME": str(tmp_path / "hf")}
    for setting, row, model_args in (
        ("full tokens", "full tokens", "method=none"),
        ("nuwa @ 64", "nuwa", "method=nuwa,budget=64"),
    ):
        theirs = _lmms_eval(
            f"pretrained={SHIPPED_BASE},{model_args}",
            "nuwa_synthetic_vqa,nuwa_synthetic_grounding",
            tmp_path / f"lmms_{row.replace(' ', '_')}",
            env,
        )
        vqa, grounding = theirs["results"]["nuwa_synthetic_vqa"], theirs["results"]["nuwa_synthetic_grounding"]
        assert vqa["vqa_em,none"] == pytest.approx(ours[row]["vqa_em"], abs=1e-12)
        assert grounding["grounding_acc50,none"] == pytest.approx(ours[row]["grounding_acc50"], abs=1e-12)
        assert grounding["grounding_miou,none"] == pytest.approx(ours[row]["grounding_miou"], abs=1e-12)
        assert grounding["unparseable,none"] == ours[row]["unparseable"]
        said = {p["id"]: p["prediction"] for p in predictions[setting]}
        answered = [
            said[f"test-{s['doc_id']:06d}-{task}"] == s["filtered_resps"].strip()
            for task in ("vqa", "grounding")
            for s in theirs["samples"][f"nuwa_synthetic_{task}"]
        ]
        assert len(answered) == 2 * IMAGES and all(answered)  # the same answer to every record, not only the means
    assert 0 < ours["nuwa"]["grounding_miou"] < ours["full tokens"]["grounding_miou"]  # the settings really differ


@pytest.fixture()
def lmms_model(tiny_base_dir, tmp_path):
    from nuwa_train.harness.model import NuwaLMM

    export = tmp_path / "export"
    shutil.copytree(tiny_base_dir, export)
    (export / "nuwa_config.json").write_text(json.dumps(NuwaConfig(budget=128, stage2_layer=0.75).to_dict()))
    return NuwaLMM, export


def test_the_plugin_runs_an_exports_trained_settings_unless_an_argument_overrides_them(lmms_model):
    NuwaLMM, export = lmms_model
    model = NuwaLMM(pretrained=str(export), batch_size="2")  # lmms-eval passes --batch_size as a string
    assert (model.pruning.budget, model.pruning.stage2_layer, model.batch_size) == (128, 0.75, 2)
    assert model.model._nuwa.config == model.pruning
    model = NuwaLMM(pretrained=str(export), budget=64)
    assert (model.pruning.budget, model.pruning.stage2_layer) == (64, 0.75)
    assert getattr(NuwaLMM(pretrained=str(export), method="none").model, "_nuwa", None) is None


def test_the_plugin_loads_an_adapter_only_export_onto_its_base(tiny_base_dir, tmp_path):
    from nuwa_train.export import export_module
    from nuwa_train.harness.model import NuwaLMM
    from nuwa_train.lightning import NuwaFineTuner

    adapter = export_module(
        NuwaFineTuner(model_path=tiny_base_dir, pruning=NuwaConfig(budget=128)), tmp_path / "adapter", merge=False
    )
    assert (adapter / "adapter_config.json").is_file()
    lm = NuwaLMM(pretrained=str(adapter))
    assert not hasattr(lm.model, "peft_config") and lm.model._nuwa.config.budget == 128


def test_bad_model_arguments_are_errors_naming_them(lmms_model, tmp_path):
    NuwaLMM, export = lmms_model
    with pytest.raises(ValueError, match="bugdet: not an argument of the nuwa model"):
        NuwaLMM(pretrained=str(export), bugdet=64)
    with pytest.raises(ValueError, match="--model_args: budget=0"):
        NuwaLMM(pretrained=str(export), budget=0)
    with pytest.raises(ValueError, match=f"pretrained={tmp_path / 'nowhere'}: not a HF model directory or an export"):
        NuwaLMM(pretrained=str(tmp_path / "nowhere"))


def _non_square_refcoco_rec(folder: Path) -> list[dict]:
    """A local file with lmms-lab RefCOCO's fields: image paths, [x, y, w, h] pixel boxes, expressions."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rows = []
    for number, (size, box) in enumerate(
        (((120, 80), [10, 20, 50, 40]), ((64, 96), [8, 50, 40, 30]), ((100, 100), [30, 30, 40, 20]))
    ):
        Image.new("RGB", size, (40 * number, 90, 160)).save(folder / "images" / f"{number}.png")
        rows.append(
            {
                "question_id": f"q{number}",
                "image": f"images/{number}.png",
                "bbox": box,
                "answer": ["the red circle"],
                "size": size,
            }
        )
    (folder / "refcoco_rec.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "size"} for r in rows]))
    return rows


def test_lmms_evals_own_refcoco_scorers_read_the_plugins_llava_answers(tmp_path, monkeypatch):
    """A LLaVA model answers on its padded square; refcoco_bbox_rec scores on the image: the plugin converts."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    import nuwa_train.harness.model as plugin
    from nuwa_train.models.families import FAMILIES

    model, processor = FAMILIES["llava"].build_tiny(words=["the", "red", "circle"])
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    rows = _non_square_refcoco_rec(tmp_path / "rec")
    codec = LlavaBox()
    truth = [
        codec.render_coordinates((x / w, y / h, (x + bw) / w, (y + bh) / h), ImageFrame(w, h))
        for row in rows
        for (w, h), (x, y, bw, bh) in [(row["size"], row["bbox"])]
    ]
    assert truth[0] != "[0.08, 0.25, 0.50, 0.75]"  # the padded square's numbers are not the image's
    answers = iter(truth)  # what a perfect LLaVA says, in request (= document) order
    monkeypatch.setattr(
        plugin,
        "generate_answers",
        lambda model, tokenizer, batch, max_new_tokens: [next(answers) for _ in range(batch["input_ids"].shape[0])],
    )
    monkeypatch.setenv("NUWA_REFCOCO_REC_FILE", str(tmp_path / "rec" / "refcoco_rec.json"))
    for key, value in {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    lm = plugin.NuwaLMM(pretrained=str(tmp_path / "llava"), method="none")
    scored = simple_evaluate(
        model=lm, tasks=["nuwa_refcoco_bbox_rec"], task_manager=TaskManager(include_path=str(TASKS_DIR))
    )["results"]["nuwa_refcoco_bbox_rec"]
    assert scored["refcoco_ACC@0.5,none"] == 1.0 and scored["refcoco_IoU,none"] > 0.95


@pytest.mark.parametrize("family", ["tiny_base", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_plugin_answers_every_family_as_evaluate_does(family, tiny_base_dir, tmp_path):
    """Batched, left-padded, pruned (Nüwa at 64): the plugin's answers are `evaluate`'s, request by request."""
    from types import SimpleNamespace

    from nuwa_train.data import SyntheticConfig, generate_records, render
    from nuwa_train.evaluation import evaluate
    from nuwa_train.harness.model import GROUNDING, REQUEST_KIND, NuwaLMM
    from nuwa_train.models import load_vlm
    from nuwa_train.models.families import FAMILIES

    config = SyntheticConfig()
    records = list(generate_records(config, "val", 3))  # 3 VQA + 3 grounding, images of several layouts
    if family == "tiny_base":
        directory = tiny_base_dir
    else:
        words = sorted({w.strip("?.,").lower() for r in records for w in (r.prompt + " " + r.answer).split()})
        model, processor = FAMILIES[family].build_tiny(words=words)
        directory = tmp_path / family
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    expected = evaluate(*load_vlm(directory), records, pruning=NuwaConfig(budget=64), batch_size=4, progress=False)
    lm = NuwaLMM(pretrained=str(directory), method="nuwa", budget=64, batch_size=4)
    docs = [{"image": render(r.scene, config)} for r in records]
    lm.task_dict = {"task": {"test": docs}}
    requests = [
        SimpleNamespace(
            args=(
                r.expression if r.task == "grounding" else r.prompt,
                {REQUEST_KIND: GROUNDING} if r.task == "grounding" else {},
                lambda doc: [doc["image"]],
                number,
                "task",
                "test",
            )
        )
        for number, r in enumerate(records)
    ]
    answers = lm.generate_until(requests)
    assert [a.strip() for a in answers] == [p.prediction for p in expected.predictions]
    assert lm.model._nuwa.config.budget == 64


def test_the_launcher_fails_when_lmms_eval_writes_no_results_and_says_what_the_tasks_need(tmp_path):
    """lmms-eval itself exits 0 when a task's data folder is missing (a RetryError deep in `datasets`)."""
    missing = tmp_path / "never_exported"
    environment = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "NUWA_SYNTHETIC_DIR": str(missing)}
    done = subprocess.run(
        [
            str(ROOT / "launch.sh"),
            "lmms-eval",
            "--model",
            "nuwa",
            "--model_args",
            f"pretrained={SHIPPED_BASE}",
            "--tasks",
            "nuwa_synthetic_vqa",
            "--output_path",
            str(tmp_path / "out"),
            "--limit",
            "2",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"wrote no results file under {tmp_path / 'out'}" in done.stderr
    assert "NUWA_SYNTHETIC_DIR" in done.stderr and f"(now: {missing})" in done.stderr
    assert f"nuwa-train export-data {missing} --format llava-refcoco" in done.stderr
    assert not list((tmp_path / "out").glob(".launch-started-*"))  # the wrapper's marker is gone
