"""The package installs as one namespace, and pixi.toml matches pyproject.toml."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch", "dask[distributed]": "dask"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pixi():
    return tomllib.loads((ROOT / "pixi.toml").read_text())


def test_pixi_dependencies_match_pyproject():
    py = _pyproject()["project"]
    pixi = _pixi()
    conda = {**pixi["dependencies"], **pixi["feature"]["test"]["dependencies"]}
    wanted = py["dependencies"] + py["optional-dependencies"]["test"]
    for text in wanted:
        req = Requirement(text)
        key = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
        name = CONDA_NAMES.get(key, req.name)
        assert name in conda, f"{req.name} is in pyproject.toml but not in pixi.toml"
        assert conda[name].replace(" ", "") == str(req.specifier).replace(" ", ""), (
            f"{req.name}: pyproject says {req.specifier}, pixi says {conda[name]}")
    assert "distributed" in conda  # dask[distributed] is two packages on conda-forge


def test_pixi_tasks_are_the_readme_commands():
    tasks = _pixi()["tasks"]
    assert tasks["survey-qa"] == "survey-qa"
    assert tasks["test"].startswith("pytest")
    readme = (ROOT / "README.md").read_text()
    assert "pixi run survey-qa --night 2024-03-01" in readme
    assert "pixi run test" in readme


def test_torch_is_pinned_in_constraints():
    lines = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in lines
    assert "torch==2.13.0" in _pyproject()["project"]["dependencies"]


@pytest.mark.slow
def test_wheel_holds_one_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("survey_qa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("survey_qa/cli.py", "survey_qa/pipeline/io.py", "survey_qa/flows/nightly.py",
                   "survey_qa/hpc/cluster.py", "survey_qa/models/__init__.py",
                   "survey_qa/weights/classifier.safetensors",
                   "survey_qa/weights/autoencoder.safetensors"):
        assert module in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"survey_qa", wheel.name.rsplit("-", 3)[0] + ".dist-info"} | {
        n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")}


def test_shipped_weights_load_and_name_the_script_that_made_them():
    from survey_qa.config import load_config
    from survey_qa.flows.nightly import load_models
    from survey_qa.models.weights import (AUTOENCODER_FILE, packaged_weights,
                                          read_autoencoder_metadata)

    models = load_models(load_config())  # the defaults: the packaged models
    assert models.classifier is not None and models.scorer is not None
    ae_meta = read_autoencoder_metadata(packaged_weights(AUTOENCODER_FILE))
    recipes = [models.classifier.meta["recipe"], ae_meta["recipe"]]
    assert recipes[0].split()[0] == "models/train_shipped_classifier.sh"
    assert recipes[1].split()[0] == "models/train_shipped.sh"
    assert all((ROOT / r.split()[0]).is_file() for r in recipes)


def test_shipped_weights_keep_their_versions():
    """The model_version strings of the packaged weights are their files' checksums."""
    from survey_qa.models.classifier_inference import load_classifier
    from survey_qa.models.weights import file_sha256, load_scorer, packaged_weights

    scorer, clf = load_scorer(None), load_classifier(None)
    ae_digest = file_sha256(packaged_weights("autoencoder.safetensors"))
    cnn_digest = file_sha256(packaged_weights("classifier.safetensors"))
    assert scorer.version == f"ae1-{ae_digest[:10]}"
    assert clf.version == f"cnn-{cnn_digest[:12]}" == f"cnn-{clf.meta['weights_sha256'][:12]}"
