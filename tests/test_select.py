"""survey-qa select: the filter, the weight, and each stacker's list read the way it reads it."""
import csv
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from survey_qa.cli import main
from survey_qa.pipeline import outputs, selection
from survey_qa.pipeline.flags import SOURCE_FLAGS
from survey_qa.pipeline.schema import SOURCE_SCHEMA, empty_exposure_row, rows_to_table

NIGHT = "2024-07-01"


# ---------------------------------------------------------------- readers, as each tool reads


def read_dss(path: Path) -> list[tuple[bool, str, Path]]:
    """DeepSkyStacker's FrameList::loadFilesFromList: two fixed header lines, then
    CHECKED<TAB>TYPE<TAB>FILE rows; relative paths are taken from the list's folder; the
    file must exist."""
    lines = path.read_text().split("\n")
    assert lines[0] == "DSS file list"
    assert lines[1] == "CHECKED\tTYPE\tFILE"
    out = []
    for line in lines[2:]:
        if not line.strip() or line.startswith("#"):
            continue
        checked, kind, name = line.split("\t")
        assert checked in ("0", "1") and kind in ("light", "dark", "flat", "offset",
                                                  "darkflat", "reflight")
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        assert file.is_file(), file
        out.append((checked == "1", kind, file))
    return out


def read_siril_seq(path: Path) -> tuple[str, list[tuple[int, bool]], list[Path]]:
    """Siril's readseqfile: an S line parsed with "'%511[^']' %d %d %d %d %d %d", an L
    line, one 'I filenum incl' line per image; image k is <seqname><k:0{fixed}d>.fit in
    the sequence's folder."""
    name, images = None, []
    header = None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("S "):
            m = re.match(r"S '([^']{1,511})' (-?\d+) (-?\d+) (-?\d+) (-?\d+) (-?\d+) (-?\d+)",
                         line)
            assert m, line
            name = m.group(1)
            header = [int(v) for v in m.groups()[1:]]
            rest = line[m.end():].split()
            fz = int(rest[1]) if len(rest) >= 2 else 0
        elif line.startswith("L "):
            int(line.split()[1])
        elif line.startswith("I "):
            num, incl = (int(v) for v in line.split()[1:3])
            images.append((num, bool(incl)))
    beg, number, selnum, fixed, _ref, _version = header
    assert number == len(images) > 0 and beg == 1
    assert selnum == sum(inc for _, inc in images)
    files = [path.parent / (f"{name}{num:0{fixed}d}.fit" + (".fz" if fz else ""))
             for num, _ in images]
    assert all(f.exists() for f in files)
    return name, images, files


def read_xpsm(path: Path) -> list[tuple[bool, str]]:
    """A PixInsight process icon file: XML in the xpsm namespace; the ImageIntegration
    instance's 'images' table, one row of enabled/path/drizzlePath/
    localNormalizationDataPath cells per frame."""
    ns = {"x": selection.XPSM_NS}
    root = ET.parse(path).getroot()
    assert root.tag == f"{{{selection.XPSM_NS}}}xpsm"
    (inst,) = root.findall("x:instance[@class='ImageIntegration']", ns)
    icon = root.find("x:icon", ns)
    assert icon.get("instance") == inst.get("id")
    table = inst.find("x:table[@id='images']", ns)
    rows = table.findall("x:tr", ns)
    assert int(table.get("rows")) == len(rows)
    out = []
    for tr in rows:
        cells = {td.get("id"): td.get("value") for td in tr.findall("x:td", ns)}
        assert list(cells) == ["enabled", "path", "drizzlePath", "localNormalizationDataPath"]
        assert cells["enabled"] in ("true", "false")
        out.append((cells["enabled"] == "true", cells["path"]))
    return out


# ---------------------------------------------------------------- a night's catalogs


def _frame(path: Path, n=64):
    fits.PrimaryHDU(np.zeros((n, n), np.float32)).writeto(path)


FRAMES = [  # exposure, class, fwhm_arcsec, fwhm_px, sky_noise, star flux per source
    ("a", "good", 1.2, 4.0, 10.0, 1000.0),
    ("b", "good", 2.4, 8.0, 10.0, 1000.0),
    ("c", "bad_seeing", 3.0, 10.0, 10.0, 1000.0),
    ("d", "good", 1.2, 4.0, 20.0, 500.0),
]


@pytest.fixture
def night(tmp_path):
    """Hand-written catalogs with known weights, and the frames they name."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / NIGHT).mkdir(parents=True)
    rows, srcs = [], []
    for i, (e, cls, fa, fp, noise, flux) in enumerate(FRAMES):
        path = raw / NIGHT / f"{e}.fits"
        _frame(path)
        r = empty_exposure_row()
        r.update(exposure=e, detector="0", path=str(path), status="ok", quality_class=cls,
                 fwhm_arcsec=fa, fwhm_px=fp, sky_noise=noise, sky_level=100.0,
                 ellipticity=0.05, date_obs=f"2024-07-02T0{i}:00:00", image_type="light",
                 reason=f"{cls} because")
        rows.append(r)
        for k in range(10):
            srcs.append({"exposure": e, "detector": "0", "id": k, "flux": flux, "flags": 0})
        srcs.append({"exposure": e, "detector": "0", "id": 99, "flux": 1e9,
                     "flags": SOURCE_FLAGS["SATURATED"].value})  # never counted
    failed = empty_exposure_row()
    _frame(raw / NIGHT / "z.fits")
    failed.update(exposure="z", detector="ALL", path=str(raw / NIGHT / "z.fits"),
                  status="failed", error="unreadable FITS file")
    rows.append(failed)
    outputs.consolidate(rows_to_table(rows), out, "exposures", NIGHT)
    src = pd.DataFrame(srcs)
    for f in SOURCE_SCHEMA:
        if f.name not in src:
            src[f.name] = 0.0 if f.name not in ("exposure", "detector") else ""
    outputs.consolidate(rows_to_table(src.to_dict("records"), SOURCE_SCHEMA), out, "sources",
                        NIGHT)
    return raw, out


def test_weight_follows_inverse_variance_of_star_flux():
    rows = pd.DataFrame({"exposure": ["a", "b", "c"], "fwhm_px": [4.0, 8.0, np.nan],
                         "src_fwhm_px": [np.nan, np.nan, 4.0], "sky_noise": [10.0, 10.0, 20.0]})
    flux = pd.Series({"a": 1e4, "b": 1e4, "c": 1e4})
    w = selection.frame_weights(rows, flux)
    assert w.tolist() == pytest.approx([1.0, 0.25, 0.25])  # FWHM x2 or noise x2: a quarter
    assert math.isnan(selection.frame_weights(rows, pd.Series({"a": 1e4}))[1])


@pytest.mark.parametrize("expr", ["import os", "__import__('os').system('true')",
                                  "quality_class.str.len() > 3", "@x > 1", "nosuch < 2", ""])
def test_bad_expressions_are_refused(expr):
    with pytest.raises(ValueError, match="--where"):
        selection.check_expression(expr, ["quality_class", "fwhm_arcsec"])


def test_select_writes_every_format_that_parses(night, tmp_path):
    raw, out = night
    dest = tmp_path / "lists"
    assert main(["select", "--night", NIGHT, "--out-root", str(out), "--output", str(dest),
                 "--where", "quality_class == 'good' and fwhm_arcsec < 2.0"]) == 0
    chosen = {str(raw / NIGHT / f"{e}.fits") for e in ("a", "d")}

    listed = (dest / "frames.txt").read_text().splitlines()
    assert set(listed) == chosen

    with open(dest / "frames.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [c for c in table[0]] == list(selection.CSV_COLUMNS)
    weights = {Path(r["path"]).stem: float(r["weight"]) for r in table}
    # a: (10000 / (10 * 4))^2; d: (5000 / (20 * 4))^2 -> a quarter squared
    assert weights["a"] == pytest.approx(1.0)
    assert weights["d"] == pytest.approx(1 / 16)

    dss = read_dss(dest / "frames.dssfilelist")
    assert {str(p) for c, _, p in dss if c} == chosen
    assert len(dss) == 4  # every measured light of the night, the others unchecked

    name, images, files = read_siril_seq(dest / "siril" / "survey_qa_.seq")
    picked = {os.path.realpath(f) for (n, inc), f in zip(images, files) if inc}
    assert picked == chosen and len(files) == 4

    xpsm = read_xpsm(dest / "frames.xpsm")
    assert {p for on, p in xpsm if on} == chosen and len(xpsm) == 4


def test_class_selection_copy_and_link_leave_originals(night, tmp_path):
    raw, out = night
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (raw / NIGHT).glob("*.fits")}
    assert main(["select", "--night", NIGHT, "--out-root", str(out), "--class", "bad_seeing",
                 "--copy-to", str(tmp_path / "copies")]) == 0
    assert main(["select", "--night", NIGHT, "--out-root", str(out), "--class", "good",
                 "--link-to", str(tmp_path / "links")]) == 0
    copies = sorted(p.name for p in (tmp_path / "copies").iterdir())
    assert copies == ["c.fits"] and not (tmp_path / "copies" / "c.fits").is_symlink()
    links = sorted(tmp_path.joinpath("links").iterdir())
    assert [p.name for p in links] == ["a.fits", "b.fits", "d.fits"]
    assert all(p.is_symlink() and p.resolve().parent == (raw / NIGHT).resolve() for p in links)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (raw / NIGHT).glob("*.fits")}
    assert after == before


def test_wrong_arguments_exit_2(night, capsys):
    raw, out = night
    base = ["select", "--night", NIGHT, "--out-root", str(out)]
    assert main([*base, "--where", "fwhm < 2"]) == 2
    assert "unknown column 'fwhm'" in capsys.readouterr().err
    assert main([*base, "--where", "quality_class =="]) == 2
    assert main([*base, "--class", "great"]) == 2
    assert main(["select", "--night", "1999-01-01", "--out-root", str(out)]) == 2
