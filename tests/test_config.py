"""Configuration: defaults, files, command line, validation."""
import pytest

from survey_qa.cli import config_overrides, night_parser
from survey_qa.config import Config, describe, load_config


def test_defaults_are_valid_and_documented():
    cfg = load_config()
    assert cfg.classify.seeing_limit_arcsec == 1.4
    rows = describe()
    assert all(doc for _, _, doc in rows)
    assert any(name == "cluster.slurm.max_jobs" for name, _, _ in rows)


def test_file_then_command_line(tmp_path):
    f = tmp_path / "qa.yaml"
    f.write_text("run:\n  out_root: /from/file\n  raw_root: /raw\nclassify:\n"
                 "  seeing_limit_arcsec: 1\n")
    a = night_parser().parse_args(["--night", "2024-03-01", "--out-root", "/from/cli"])
    cfg = load_config(f, config_overrides(a))
    assert cfg.run.out_root == "/from/cli"  # the command line wins
    assert cfg.run.raw_root == "/raw"  # the file beats the default
    assert cfg.classify.seeing_limit_arcsec == 1.0
    assert cfg.cluster.kind == "local"


def test_environment_variable(tmp_path, monkeypatch):
    f = tmp_path / "qa.yaml"
    f.write_text("cluster:\n  workers: 3\n")
    monkeypatch.setenv("SURVEY_QA_CONFIG", str(f))
    assert load_config().cluster.workers == 3


@pytest.mark.parametrize("overrides, message", [
    ({"classify": {"seeing_limit_arcsec": -1.0}}, "outside"),
    ({"classify": {"nonsense": 1}}, "unknown configuration key"),
    ({"cluster": {"kind": "pbs"}}, "not one of"),
    ({"psf": {"max_stars": "many"}}, "is not a"),
    ({"classify": {"trail_ratio_bad": 4.0}}, "must exceed"),
    ({"cluster": {"slurm": {"min_jobs": 5, "max_jobs": 2}}}, "min_jobs"),
])
def test_bad_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_round_trip_through_dict():
    cfg = Config()
    again = load_config(overrides=cfg.to_dict())
    assert again == cfg


def test_cluster_option_offers_the_configured_kinds():
    a = night_parser().parse_args(["--night", "2024-03-01", "--cluster", "slurm",
                                   "--workers", "3"])
    cfg = load_config(None, config_overrides(a))
    assert (cfg.cluster.kind, cfg.cluster.workers) == ("slurm", 3)
    with pytest.raises(SystemExit):
        night_parser().parse_args(["--night", "2024-03-01", "--cluster", "pbs"])
