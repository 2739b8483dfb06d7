"""A model that leaves its run: custom label sets end to end, vkd-export, VKDImageClassifier, vkd-predict on
PNG / JPEG / 16-bit PNG / DICOM originals (equal to vkd-eval on the converted shards), bad input rows,
vkd-compare."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from test_dicom import _dataset, _jpeg_bytes, _jpeg_dataset, _save, _values_12bit
from vkd_dist.classifier import VKDImageClassifier
from vkd_dist.compare import main as compare_main
from vkd_dist.configure import load_config
from vkd_dist.data.sources import ConvertOptions
from vkd_dist.data.sources.manifest import convert_manifest
from vkd_dist.deploy import main as export_main
from vkd_dist.evaluate import main as eval_main
from vkd_dist.model_dir import ModelDirError
from vkd_dist.predict import main as predict_main
from vkd_dist.train import train

LABELS = ["COVID-19", "Nodule"]
N = 48


def _radiograph(i: int, rng) -> np.ndarray:
    """A gradient with a bright blob for COVID-19 and a dark dot for Nodule, sizes varying per image."""
    h, w = 90 + (i % 7) * 9, 80 + (i % 5) * 11
    yy, xx = np.mgrid[:h, :w]
    img = 50 + 120 * yy / h + rng.normal(0, 10, (h, w))
    if i % 3 == 0:
        img += 70 * np.exp(-(((yy - h / 3) ** 2 + (xx - w / 3) ** 2) / (2 * (h / 8) ** 2)))
    if i % 4 == 0:
        img[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (h // 12) ** 2] = 15
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """A manifest of 48 originals (8-bit PNG, 16-bit PNG, JPEG) with two labels outside CheXpert, converted with
    --label-set columns --image-format png, and a 4-step run trained on it (model input 48 px, shards 64 px)."""
    root = tmp_path_factory.mktemp("hospital")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        img = _radiograph(i, rng)
        if i % 6 == 1:
            name = f"img/{i:03d}.png"
            Image.fromarray(img.astype(np.uint16) * 16 + 7).save(root / name)  # 16-bit: windowed, not truncated
        elif i % 6 == 2:
            name = f"img/{i:03d}.jpg"
            Image.fromarray(img).save(root / name, quality=90)
        else:
            name = f"img/{i:03d}.png"
            Image.fromarray(img).save(root / name)
        split = "train" if i < 28 else "val" if i < 36 else "test"
        rows.append({"image": name, "report": f"study {i} {'ground glass' if i % 3 == 0 else 'clear'}",
                     "patient": f"p{i // 2}", "split": split, "covid": int(i % 3 == 0),
                     "Nodule": "" if i % 11 == 5 else int(i % 4 == 0)})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = root / "shards"
    convert_manifest(root / "manifest.csv", data, opts=ConvertOptions(image_size=64, fmt="png"), text_col="report",
                     label_cols="covid=COVID-19,Nodule", label_set="columns", patient_col="patient",
                     split_col="split", workers=1, progress=False)
    run = root / "run"
    train(load_config(overrides=tiny_overrides(data, run, **{
        "data.image_size": 48, "train.max_steps": 4, "train.eval_every": 2, "train.ckpt_every": 4,
        "train.bootstrap_resamples": 200})))
    return root, data, run, rows


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_custom_label_set_end_to_end(hospital):
    root, data, run, _ = hospital
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["labels"] == LABELS and meta["eval_policy"] == {"uncertain": "ignore", "missing": "negative"}
    assert json.loads((run / "labels.json").read_text())["labels"] == LABELS
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["labels"] == LABELS and metrics["checkpoint"] == "final"
    assert "macro_auroc_chexpert5" not in metrics  # only where the data set has those five labels
    assert metrics["n"] == {"COVID-19": 12, "Nodule": 12}  # the blank Nodule cell scores as a negative


def test_resume_or_eval_on_other_labels_is_refused(hospital, tiny_data, capsys):
    _, data, run, _ = hospital
    before = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"trained on labels \[COVID-19, Nodule\].*No Finding"):
        train(load_config(overrides=tiny_overrides(tiny_data, run, resume="latest", **{"data.image_size": 48})))
    assert (run / "config.yaml").read_text() == before  # the refused resume left the run as it was
    from vkd_dist.train import main as train_main

    capsys.readouterr()
    assert train_main(tiny_overrides(tiny_data, run, resume="latest", **{"data.image_size": 48})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "COVID-19, Nodule" in err[0] and "No Finding" in err[0]
    assert eval_main(["--run", str(run), "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "COVID-19, Nodule" in err[0] and "No Finding" in err[0]


def test_predict_on_originals_equals_eval_on_converted_shards(hospital, tmp_path, capsys):
    root, data, run, rows = hospital
    assert eval_main(["--run", str(run), "--checkpoint", "final", "--split", "test", "--predictions",
                      str(tmp_path / "eval.csv"), "--plots", str(tmp_path / "plots")]) == 0
    assert export_main([str(run), "--checkpoint", "final", "--out", str(tmp_path / "model")]) == 0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "macro AUROC" in card and "95 %" in card and "Intended use" in card  # test_metrics.json is final's
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["labels"] == LABELS
    preprocessing = {"source_size": 64, "resize": "crop", "image_size": 48, "channels": 1}
    assert preprocessing.items() <= config["preprocessing"].items()
    evals = {r["key"]: r for r in _read(tmp_path / "eval.csv")}
    assert list(next(iter(evals.values()))) == ["key", "patient_id", *LABELS]
    originals = {}
    for key in evals:  # manifest keys are row-NNNNNNN, the 1-based data row: join back to the CSV
        originals[str(root / rows[int(key.split("-")[1]) - 1]["image"])] = key
    assert predict_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "pred.csv"),
                         "--batch-size", "5", *originals]) == 0
    preds = _read(tmp_path / "pred.csv")
    assert [r["path"] for r in preds] == list(originals) and all(r["error"] == "" for r in preds)
    diff = max(abs(float(r[n]) - float(evals[originals[r["path"]]][n])) for r in preds for n in LABELS)
    print(f"predict vs eval max abs difference: {diff:.2e} over {len(preds)} images")
    assert diff <= 1e-5
    for name in ("roc.png", "reliability.png"):  # real figures: decodable, not blank
        with Image.open(tmp_path / "plots" / name) as im:
            arr = np.asarray(im.convert("L"))
        assert arr.shape[0] > 100 and arr.std() > 5


def test_exported_model_needs_nothing_from_its_run(hospital, tmp_path):
    root, data, run, rows = hospital
    assert export_main([str(run), "--checkpoint", "best", "--out", str(tmp_path / "m")]) == 0
    away = tmp_path / "elsewhere"
    shutil.move(str(run), str(away / "run"))  # no run dir, tokenizer, shards or config.yaml left behind
    shutil.move(str(data), str(away / "shards"))
    try:
        model = VKDImageClassifier.from_pretrained(tmp_path / "m")
        image = model.load_image(root / rows[40]["image"])
        probs, std = model.predict_images(image[None])
        assert probs.shape == (1, 2) and std is None and ((probs > 0) & (probs < 1)).all()
        probs2, std2 = model.predict_images(image[None], mc_samples=8)
        assert std2.shape == (1, 2) and (std2 > 0).all()
        model.save_pretrained(tmp_path / "m2")
        again = VKDImageClassifier.from_pretrained(tmp_path / "m2")
        assert np.array_equal(again.predict_images(image[None])[0], probs)
    finally:
        shutil.move(str(away / "run"), str(run))
        shutil.move(str(away / "shards"), str(data))
    card = (tmp_path / "m" / "README.md").read_text()
    same = json.loads((run / "best" / "meta.json").read_text())["step"] == 4  # best/ holds final/'s weights
    assert ("Not evaluated for these weights" in card) != same  # test_metrics.json describes final/'s weights


def test_dicom_inputs_give_the_png_probabilities(hospital, tmp_path):
    root, _, run, rows = hospital
    assert export_main([str(run), "--checkpoint", "final", "--out", str(tmp_path / "model")]) == 0
    img = _radiograph(3, np.random.default_rng(5))
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(img).save(d / "a.png")
    _save(_dataset(img), d / "a.dcm")
    _save(_dataset(255 - img, pi="MONOCHROME1"), d / "a_mono1.dcm")
    values = _values_12bit()
    Image.fromarray(values).save(d / "b16.png")
    _save(_dataset((values + 1024).astype(np.uint16), RescaleSlope=1, RescaleIntercept=-1024), d / "b16.dcm")
    jpeg = _jpeg_bytes(img)
    (d / "c.jpg").write_bytes(jpeg)
    _save(_jpeg_dataset(img, jpeg), d / "c_jpeg.dcm")
    assert predict_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "p.csv"), str(d)]) == 0
    rows_out = {r["path"].rsplit("/", 1)[1]: r for r in _read(tmp_path / "p.csv")}
    assert set(rows_out) == {"a.png", "a.dcm", "a_mono1.dcm", "b16.png", "b16.dcm", "c.jpg", "c_jpeg.dcm"}
    for dcm, ref in (("a.dcm", "a.png"), ("a_mono1.dcm", "a.png"), ("b16.dcm", "b16.png"), ("c_jpeg.dcm", "c.jpg")):
        for n in LABELS:
            assert abs(float(rows_out[dcm][n]) - float(rows_out[ref][n])) <= 1e-4, (dcm, n)


def test_bad_inputs_become_rows_and_the_rest_is_predicted(hospital, tmp_path, capsys):
    root, _, run, rows = hospital
    model_dir = tmp_path / "model"
    assert export_main([str(run), "--checkpoint", "final", "--out", str(model_dir)]) == 0
    good = str(root / rows[0]["image"])
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((root / rows[0]["image"]).read_bytes()[:300])
    no_pixels = _dataset(_radiograph(1, np.random.default_rng(1)))
    del no_pixels.PixelData
    _save(no_pixels, tmp_path / "empty.dcm")
    missing = tmp_path / "nope.png"
    out = tmp_path / "p.csv"
    args = ["--model", str(model_dir), "--out", str(out), "--mc", "4"]
    assert predict_main([*args, good, str(truncated), str(tmp_path / "empty.dcm"), str(missing)]) == 0
    got = _read(out)
    assert list(got[0]) == ["path", *LABELS, *(f"{n}_std" for n in LABELS), "unlike_training", "error"]
    assert [r["path"] for r in got] == [good, str(truncated), str(tmp_path / "empty.dcm"), str(missing)]
    assert got[0]["error"] == "" and float(got[0]["COVID-19_std"]) > 0
    assert got[1]["error"].startswith("truncated_image") and got[1]["COVID-19"] == ""
    assert "no pixel data" in got[2]["error"] and got[3]["error"].startswith("missing_image")
    capsys.readouterr()
    assert predict_main([*args, str(truncated)]) == 1  # no row has probabilities
    assert predict_main(["--model", str(model_dir), str(tmp_path / "empty-folder-*.png")]) == 2  # nothing to do
    assert "no input images" in capsys.readouterr().err


def test_broken_model_dirs_are_one_line_errors(hospital, tmp_path, capsys):
    root, _, run, rows = hospital
    model_dir = tmp_path / "model"
    assert export_main([str(run), "--checkpoint", "final", "--out", str(model_dir)]) == 0
    (model_dir / "config.json").rename(tmp_path / "config.json")
    capsys.readouterr()
    assert predict_main(["--model", str(model_dir), str(root / rows[0]["image"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model_dir / "config.json") in err[0]
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"]["latent_dim"] += 1  # the weights no longer fit
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=r"model\.safetensors: tensor .* has shape"):
        VKDImageClassifier.from_pretrained(model_dir)


def test_compare_runs_is_paired(hospital, tmp_path, capsys):
    _, data, run, _ = hospital
    other = tmp_path / "seed1"
    train(load_config(overrides=tiny_overrides(data, other, **{
        "data.image_size": 48, "train.max_steps": 4, "train.seed": 1, "train.test_at_end": False})))
    out = tmp_path / "same.json"
    assert compare_main(["--a", str(run), "--b", str(run), "--checkpoint", "final", "--bootstrap", "200",
                         "--out", str(out)]) == 0
    same = json.loads(out.read_text())
    assert same["delta_macro_auroc"] == 0 and same["ci"] == [0, 0] and same["p_value"] == 1
    assert compare_main(["--a", str(run), "--b", str(other), "--checkpoint", "final", "--bootstrap", "200",
                         "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["macro_labels"] == LABELS and r["num_samples"] == 12 and r["num_patients"] == 6
    assert r["ci"][0] <= r["delta_macro_auroc"] <= r["ci"][1] and 0 < r["p_value"] <= 1
    assert r["per_seed_delta"] == [pytest.approx(r["delta_macro_auroc"])]
    assert "delta (a - b)" in capsys.readouterr().out


def test_compare_with_an_undefined_ci_writes_null_and_says_why(tmp_path, monkeypatch, capsys):
    """Too few positives for the patient bootstrap: label j is scored on patient j's two studies only (one
    positive, one negative), so a resample keeps every macro label only if it draws all 8 patients (p = 8!/8^8).
    No resample does: vkd-compare writes a null CI and says why instead of failing on list(None)."""
    import vkd_dist.compare as compare_module
    from vkd_dist.data.schema import SCHEMA_VERSION
    from vkd_dist.metrics import Predictions

    labels = [f"L{j}" for j in range(8)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "labels": labels,
                                                   "splits": {"test": {}}}))
    targets, mask = np.zeros((16, 8), np.float32), np.zeros((16, 8), bool)
    for j in range(8):
        targets[2 * j, j], mask[2 * j:2 * j + 2, j] = 1, True
    rng = np.random.default_rng(0)
    monkeypatch.setattr(compare_module, "_predictions", lambda *_: Predictions(
        rng.random((16, 8)).astype(np.float32), targets, mask, [f"k{i:02d}" for i in range(16)],
        [f"p{i // 2}" for i in range(16)]))
    out = tmp_path / "c.json"
    assert compare_main(["--a", "A", "--b", "B", "--data", str(data), "--bootstrap", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ci"] is None and r["p_value"] is None and r["bootstrap"]["valid"] == 0
    assert r["macro_labels"] == labels and isinstance(r["delta_macro_auroc"], float)
    assert ("CI undefined (none of the 3 paired patient resamples kept a positive and a negative of every macro "
            "label") in capsys.readouterr().out


def test_eval_predictions_with_mc_inference_carry_the_spread(hospital, tmp_path):
    _, _, run, _ = hospital
    out = tmp_path / "mc.csv"
    assert eval_main(["--run", str(run), "--checkpoint", "final", "--inference", "mc", "--bootstrap", "0",
                      "--predictions", str(out)]) == 0
    rows = _read(out)
    assert list(rows[0]) == ["key", "patient_id", *LABELS, *(f"{n}_std" for n in LABELS)]
    assert len(rows) == 12 and all(float(r["Nodule_std"]) > 0 for r in rows)


def test_a_separate_image_head_exports_and_predicts_as_its_run(tiny_data, tmp_path):
    """model.image_head=separate: vkd-export writes the image path's own classifier and vkd-predict on PNGs gives
    the probabilities of the run's full model (its last checkpoint, report path and all)."""
    import torch

    from vkd_dist.build import build_model
    from vkd_dist.data.tokens import load_tokenizer
    from vkd_dist.prepare import tokenizer_dir
    from vkd_dist.run_dir import RunDir
    from vkd_dist.weights import load_weights

    run = tmp_path / "run"
    train(load_config(overrides=tiny_overrides(tiny_data, run, **{
        "model.image_head": "separate", "train.max_steps": 2, "train.ckpt_every": 2, "train.test_at_end": False})))
    assert export_main([str(run), "--checkpoint", "final", "--out", str(tmp_path / "model")]) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architecture"]["image_head"] == "separate"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)  # the corpus's own size: no resize
    paths = [str(tmp_path / f"{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    assert predict_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "pred.csv"), *paths]) == 0
    predicted = np.array([[float(r[n]) for n in config["labels"]] for r in _read(tmp_path / "pred.csv")])

    cfg = RunDir(run).config()
    full = build_model(cfg, len(load_tokenizer(tokenizer_dir(cfg, run))), num_labels=len(config["labels"]))
    full.load_state_dict(load_weights(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert full.image_classifier is not None and full.text_encoder is not None
    expected = full.eval().predict(torch.from_numpy(images)[:, None])[0].numpy()
    assert np.abs(predicted - expected).max() <= 1e-5
    older = {**config, "architecture": {k: v for k, v in config["architecture"].items() if k != "image_head"}}
    assert VKDImageClassifier(older).image_classifier is None  # model dirs from before the key: shared
