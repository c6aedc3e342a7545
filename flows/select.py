"""``survey-qa select``: the frames of a night worth stacking, as lists stackers load.

Reads the night's catalogs, keeps the exposures that pass ``--where`` / ``--class``,
weighs them (:mod:`survey_qa.pipeline.selection`) and writes, into one folder:

- ``frames.txt``: one path per line;
- ``frames.csv``: path, class, weight and the main measurements;
- ``frames.dssfilelist``: DeepSkyStacker's file list (chosen frames checked, the others
  of the night unchecked);
- ``frames.xpsm``: a PixInsight ImageIntegration process icon with the frames (the
  others disabled);
- ``siril/survey_qa_.seq`` with ``siril/survey_qa_00001.fit`` ... links to every light
  frame of the night: a Siril sequence whose selection is the chosen frames.

Originals are never moved or changed: ``--copy-to`` copies, ``--link-to`` makes symbolic
links, and the Siril sequence is made of links.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from survey_qa import atomic, paths
from survey_qa.config import Config
from survey_qa.pipeline import selection

SIRIL_NAME = "survey_qa_"


@dataclass
class Selection:
    """What ``select`` chose and wrote."""

    night: str
    chosen: pd.DataFrame  # exposure rows with weight and star_flux_adu, best weight first
    pool: pd.DataFrame  # every measured light frame of the night (the unchosen included)
    outputs: dict[str, Path]

    def report(self) -> str:
        lines = [f"night {self.night}: {len(self.chosen)} of {len(self.pool)} frames chosen"]
        for kind, path in self.outputs.items():
            lines.append(f"  {kind:<11} {path}")
        return "\n".join(lines)


def read_night(out_root: str | Path, night: str,
               source_columns: tuple[str, ...] = ("exposure", "flux", "flags")
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The night's exposure catalog and these columns of its source catalog (empty when
    there is none); raises ValueError when the exposure catalog is absent."""
    exp = paths.catalog_file(out_root, "exposures", night)
    if not exp.is_file():
        raise ValueError(f"no exposure catalog for night {night} under "
                         f"{paths.catalog_root(out_root, 'exposures').parent} "
                         f"(run: survey-qa --night {night})")
    src = paths.catalog_file(out_root, "sources", night)
    sources = (pd.read_parquet(src, columns=list(source_columns)) if src.is_file()
               else pd.DataFrame({c: [] for c in source_columns}))
    return pd.read_parquet(exp), sources


def select_frames(cfg: Config, night: str, *, where: str | None = None,
                  classes: list[str] | None = None, out_dir: str | Path | None = None,
                  copy_to: str | Path | None = None, link_to: str | Path | None = None
                  ) -> Selection:
    """Choose a night's frames and write every list format.

    Parameters
    ----------
    where
        A pandas expression over exposure columns, plus ``weight`` and ``star_flux_adu``,
        e.g. ``"quality_class == 'good' and fwhm_arcsec < 2.0"``.
    classes
        Keep only these quality classes.
    out_dir
        Where the lists go (default ``<out-root>/selections/night=<night>``).
    copy_to, link_to
        Also copy the chosen files, or link them (symbolic links), into this folder.

    Raises ``ValueError`` on an unknown class, a bad expression or a missing catalog.
    """
    from survey_qa.pipeline.schema import CLASSES

    for c in classes or []:
        if c not in CLASSES:
            raise ValueError(f"--class: {c!r} is not one of {', '.join(CLASSES)}")
    if copy_to and link_to:
        raise ValueError("--copy-to and --link-to: choose one")
    exposures, sources = read_night(cfg.run.out_root, night)
    pool, chosen = selection.choose_frames(selection.weighted_rows(exposures, sources),
                                           where, classes)
    out = Path(out_dir) if out_dir else paths.selection_dir(cfg.run.out_root, night)
    outputs = write_lists(out, pool, chosen)
    if copy_to or link_to:
        outputs["files"] = place_files(chosen["path"].tolist(), Path(copy_to or link_to),
                                       link=bool(link_to))
    return Selection(night=night, chosen=chosen, pool=pool, outputs=outputs)


def write_lists(out: Path, pool: pd.DataFrame, chosen: pd.DataFrame) -> dict[str, Path]:
    """Write the plain list, the CSV, and the DeepSkyStacker, PixInsight and Siril lists."""
    out.mkdir(parents=True, exist_ok=True)
    chosen_paths = [str(Path(p).resolve()) for p in chosen["path"]]
    all_paths = [str(Path(p).resolve()) for p in pool["path"]]
    picked = set(chosen["exposure"])
    checked = [e in picked for e in pool["exposure"]]
    csv_rows = chosen.assign(path=chosen_paths)
    written = {
        "list": atomic.write_text(out / "frames.txt", selection.plain_list(chosen_paths)),
        "csv": atomic.write_text(out / "frames.csv", selection.csv_text(csv_rows)),
        "dss": atomic.write_text(out / "frames.dssfilelist",
                                 selection.dss_filelist(all_paths, checked)),
        "pixinsight": atomic.write_text(out / "frames.xpsm",
                                        selection.pixinsight_xpsm(all_paths, checked)),
    }
    if all_paths:
        written["siril"] = write_siril_sequence(out / "siril", all_paths, checked)
    return written


def write_siril_sequence(folder: Path, frames: list[str], included: list[bool]) -> Path:
    """Links ``survey_qa_00001.fit`` ... to the frames, and the sequence file selecting them.

    Compressed frames (``.fz``) keep their compression: Siril reads them with fz_flag 1.
    A sequence mixing compressed and uncompressed frames is not possible in Siril; then
    only the uncompressed ones are listed.
    """
    fz = [selection.is_fz(p) for p in frames]
    use_fz = all(fz)
    keep = [i for i, f in enumerate(fz) if f == use_fz]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{SIRIL_NAME}*"):
        if old.is_symlink():
            old.unlink()
    for n, i in enumerate(keep, start=1):
        _symlink(frames[i], folder / selection.siril_image_name(SIRIL_NAME, n, use_fz))
    seq = selection.siril_seq(SIRIL_NAME, [included[i] for i in keep], fz=use_fz)
    return atomic.write_text(folder / f"{SIRIL_NAME}.seq", seq)


def place_files(files: list[str], folder: Path, *, link: bool) -> Path:
    """Copy (or symlink) files into ``folder``; never touches the originals.

    An existing file of the same name that is not the same frame is an error.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        src = Path(p).resolve()
        dst = folder / src.name
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            continue
        if dst.exists() or dst.is_symlink():
            if not link and dst.is_file() and not dst.is_symlink() and \
                    dst.stat().st_size == src.stat().st_size:
                continue
            raise ValueError(f"{dst} exists and is not {src}: choose an empty folder")
        if link:
            dst.symlink_to(src)
        else:
            with atomic.atomic_target(dst) as tmp:
                shutil.copy2(src, tmp)
    return folder


def _symlink(target: str, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)

