"""The column and flag registries: schemas, mosaic rules and the generated documentation."""
import math
from pathlib import Path

import pyarrow as pa
import pytest

from survey_qa.pipeline import schema
from survey_qa.pipeline.classify import MOSAIC_COMBINE, combine_detectors, mosaic_decided
from survey_qa.pipeline.columns import (EXPOSURE_COLUMNS, MOSAIC_RULES, SOURCE_COLUMNS,
                                        Column)
from survey_qa.pipeline.flags import (EXPOSURE_FLAGS, SOURCE_FLAGS, Flag, decode_flags,
                                      flag_registry)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "columns.md"


def test_docs_are_current():
    """docs/columns.md is what ``python -m survey_qa.pipeline.schema --markdown`` prints."""
    assert DOCS.read_text() == schema.markdown(), (
        "regenerate: python -m survey_qa.pipeline.schema --markdown > docs/columns.md")


def test_docs_name_every_column_and_flag():
    text = schema.markdown()
    for c in EXPOSURE_COLUMNS + SOURCE_COLUMNS:
        assert f"| `{c.name}` |" in text
    for f in list(EXPOSURE_FLAGS.values()) + list(SOURCE_FLAGS.values()):
        assert f"| {f.bit} | {f.value} | `{f.name}` |" in text


def test_markdown_command(capsys):
    schema.main(["--markdown"])
    assert capsys.readouterr().out == schema.markdown()


@pytest.mark.parametrize("columns, table", [(EXPOSURE_COLUMNS, schema.EXPOSURE_SCHEMA),
                                            (SOURCE_COLUMNS, schema.SOURCE_SCHEMA)])
def test_schemas_follow_the_registry(columns, table):
    names = [c.name for c in columns]
    assert len(set(names)) == len(names)
    assert table.names == names
    assert all(table.field(c.name).type == c.type for c in columns)
    assert all(c.doc and c.group for c in columns)


def test_every_exposure_column_has_a_known_mosaic_rule():
    for c in EXPOSURE_COLUMNS:
        assert c.mosaic in MOSAIC_RULES, c.name
        assert c.mosaic == "decided" or c.mosaic in MOSAIC_COMBINE, c.name
        assert bool(c.levels) == (c.mosaic == "worst"), c.name
    assert all(c.mosaic == "" for c in SOURCE_COLUMNS)


def test_decided_columns_are_the_ones_the_mosaic_sets():
    rows = [schema.empty_exposure_row() | {"quality_class": "good", "n_detectors": 2}] * 2
    decided = {c.name for c in EXPOSURE_COLUMNS if c.mosaic == "decided"}
    assert set(mosaic_decided(rows, {"quality_class": "good"})) == decided


def test_empty_row_and_time_columns():
    row = schema.empty_exposure_row()
    assert list(row) == schema.EXPOSURE_SCHEMA.names
    assert row["flag_tracking"] == "none" and row["quality_class"] == ""
    assert math.isnan(row["fwhm_px"]) and row["qa_flags"] == 0 and row["fwhm_grid_px"] is None
    assert schema.TIME_COLUMNS[-1] == "t_total_s"
    assert schema.STAGE_TIME_COLUMNS == schema.TIME_COLUMNS[:-1]
    assert all(schema.EXPOSURE_SCHEMA.field(n).type == pa.float64() for n in schema.TIME_COLUMNS)
    schema.rows_to_table([row])


def test_mosaic_row_follows_each_rule():
    def det(i, **kw):
        r = schema.empty_exposure_row()
        r.update(exposure="e1", detector=f"d{i}", hdu=i, n_detectors=3, status="ok",
                 quality_class="good", image_type="light", fwhm_grid_px=[1.0],
                 src_fwhm_px=3.0, path="f.fits", nx=100 + i, **kw)
        return r

    rows = [det(0, fwhm_px=2.0, qa_flags=1, t_psf_s=1.0, n_sources=5),
            det(1, fwhm_px=4.0, qa_flags=2, t_psf_s=math.nan, n_sources=7),
            det(2, fwhm_px=math.nan, qa_flags=0, t_psf_s=0.5, n_sources=0)]
    out = combine_detectors(rows)
    assert out["nx"] == 100                              # first
    assert out["fwhm_px"] == 3.0                         # median of the finite values
    assert out["qa_flags"] == 3                          # or
    assert out["t_psf_s"] == 1.5 and out["n_sources"] == 12  # sums
    assert out["fwhm_grid_px"] == []                     # none: per region
    assert out["src_fwhm_px"] == 3.0 and out["image_type"] == "light"
    assert (out["detector"], out["hdu"], out["n_detectors"]) == ("ALL", -1, 3)  # decided
    schema.rows_to_table([out])


def test_flag_registry_rejects_a_bit_or_name_declared_twice():
    with pytest.raises(ValueError, match="bits declared twice"):
        flag_registry(Flag(0, "A", "a"), Flag(0, "B", "b"))
    with pytest.raises(ValueError, match="names declared twice"):
        flag_registry(Flag(0, "A", "a"), Flag(1, "A", "b"))


@pytest.mark.parametrize("registry", [EXPOSURE_FLAGS, SOURCE_FLAGS])
def test_flags_are_unique_documented_and_decoded(registry):
    values = [f.value for f in registry.values()]
    assert len(set(values)) == len(values)
    assert all(f.doc for f in registry.values())
    every = sum(values)
    assert decode_flags(every, registry) == sorted(registry, key=lambda n: registry[n].bit)


def test_decision_flags_are_in_the_registry():
    for name in ("NO_STARS", "NO_PSF_FIT", "CNN_OUT_OF_DOMAIN", "SKY_FALLBACK",
                 "SKY_UNMEASURED", "AE_OUT_OF_DOMAIN", "AE_NIGHT_THRESHOLD", "AE_UNAVAILABLE",
                 "ARRAYS_SKIPPED", "ILLUMINATION_NIGHT"):
        assert name in EXPOSURE_FLAGS


def test_column_type_default_empty_values():
    assert math.isnan(schema.empty_value(Column("x", pa.float64(), "", "x")))
    assert schema.empty_value(Column("x", pa.int32(), "", "x")) == 0
    assert schema.empty_value(Column("x", pa.string(), "", "x")) == ""
    assert schema.empty_value(Column("x", pa.bool_(), "", "x")) is False
    assert schema.empty_value(Column("x", pa.string(), "", "x", empty="none")) == "none"


def test_no_flag_bit_is_declared_outside_the_registry():
    """Bits are set and tested by name (flags.bits), never by a number written elsewhere."""
    import re

    root = Path(__file__).resolve().parents[1]
    by_number = re.compile(r"\b1\s*<<|\b(qa_flags|flags)\b[^\n]*[&|]=?\s*0x|"
                           r"\b(qa_flags|flags)\b\W*[&|]=?\s*\d")
    found = []
    for folder in ("pipeline", "flows", "models", "simulate", "hpc", "survey_qa"):
        for path in sorted((root / folder).rglob("*.py")):
            if path == root / "pipeline" / "flags.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if by_number.search(line):
                    found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
