"""Typed, documented configuration: one block per stage.

Every field has a type, a default, a doc and (where it makes sense) a range or a set
of choices. Precedence, highest first: command line, the user's YAML file (``--config``
or ``$SURVEY_QA_CONFIG``), the defaults written here. A stage receives its own block,
never the whole tree.

Example YAML::

    run:
      raw_root: /data/raw
      out_root: /data/qa
    classify:
      seeing_limit_arcsec: 1.1
    cluster:
      kind: slurm
      slurm:
        queue: normal
        max_jobs: 20
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Names of the places the nightly job can run (``cluster.kind``); each has a cluster
#: class of the same name in :mod:`survey_qa.hpc.cluster`.
CLUSTER_KINDS = ("local", "slurm")
# SLURM --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_WALLTIME = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+(:\d+)?)?)$")


def F(default: Any, doc: str, *, range: tuple | None = None, choices: tuple | None = None):
    """A configuration field: default, documentation and the allowed values."""
    meta = {"doc": doc, "range": range, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class IOConfig:
    """Reading frames: header keywords are used first, these are the fallbacks."""

    pixscale_arcsec: float | None = F(
        None, "Pixel scale (arcsec/px) when neither the WCS nor PIXSCALE/SECPIX give it. "
        "None: the frame is measured in pixels and its row says so.", range=(0.01, 100.0))
    gain_e_per_adu: float = F(1.0, "Gain when the header has no GAIN.", range=(1e-3, 1e3))
    read_noise_e: float = F(5.0, "Read noise when the header has no RDNOISE.", range=(0.0, 1e3))
    saturate_adu: float | None = F(
        None, "Saturation level when the header has no SATURATE. None: the highest pixel "
        "value is taken as saturation where at least `saturate_min_pixels` pixels reach it.",
        range=(0.0, None))
    saturate_min_pixels: int = F(
        5, "Pixels at the maximum value needed to infer a saturation level.", range=(1, None))
    bayer: str = F(
        "auto", "Colour-filter-array handling: 'auto' bins 2x2 when BAYERPAT/COLORTYP says "
        "the frame is a Bayer mosaic, 'bin2x2' always, 'none' never.",
        choices=("auto", "bin2x2", "none"))
    overscan: str = F(
        "auto", "'auto' trims the overscan named by DATASEC/TRIMSEC when present; 'none' keeps "
        "the whole array.", choices=("auto", "none"))
    min_image_pixels: int = F(
        64 * 64, "Smaller image HDUs (thumbnails, tables) are not treated as detectors.",
        range=(1, None))
    max_image_pixels: int = F(
        2 ** 28, "Larger images (a damaged or hostile header) fail with a reason instead of "
        "being read; 2**28 is 16384x16384.", range=(1, None))


@dataclass
class BackgroundConfig:
    """sep background mesh and the non-uniformity measurement."""

    box_px: int = F(128, "Background mesh size (pixels).", range=(8, 4096))
    filter_size: int = F(3, "Median filter over background meshes.", range=(1, 15))
    mask_sources: bool = F(True, "Re-estimate the background with detected sources masked.")
    flat: str | None = F(
        None, "Master flat field (FITS) that every frame is divided by before measuring "
        "(`--flat`); None: no flat unless `flats` names one for the frame's filter.")
    flats: dict = F({}, "Master flat field per filter: {FILTER: path}; wins over `flat` for "
                        "frames of that filter.")
    illumination: str = F(
        "median", "Without a flat: 'median' divides each frame's sky by the per-cell median "
        "of the night's normalised sky maps (vignetting and dust, but also a gradient on "
        "every frame, are absorbed), 'radial' by only the vignetting-shaped (radial) part of "
        "it, 'none' keeps the raw sky.", choices=("median", "radial", "none"))
    illumination_min_frames: int = F(
        5, "Frames of one detector geometry and filter needed for a night illumination "
        "pattern; fewer keep their raw sky non-uniformity.", range=(2, None))

    def check(self, prefix: str) -> None:
        """Every flat field named must be a file."""
        for name, path in [("flat", self.flat),
                           *((f"flats[{k!r}]", v) for k, v in self.flats.items())]:
            if path is not None and not (isinstance(path, str) and Path(path).is_file()):
                raise ValueError(f"{prefix}{name}: no flat-field file {path!r}")


@dataclass
class SourcesConfig:
    """Source extraction with sep."""

    thresh_sigma: float = F(5.0, "Detection threshold in units of the background RMS.",
                            range=(1.0, 100.0))
    min_area_px: int = F(5, "Minimum connected pixels of a detection.", range=(1, 1000))
    deblend_cont: float = F(0.005, "sep deblending contrast.", range=(0.0, 1.0))
    max_sources: int = F(50_000, "Keep at most this many detections (brightest first).",
                         range=(10, None))
    pixstack: int = F(5_000_000, "sep pixel stack (set once per worker process).",
                      range=(300_000, None))


@dataclass
class PSFConfig:
    """Star selection and the PSF fit."""

    max_stars: int = F(50, "Stars fitted per detector (spread over the S/N ranks of the "
                                 "selected stars, brightest first).", range=(5, 100_000))
    min_stars: int = F(5, "Fewer usable stars and PSF quantities are NaN with a flag.",
                       range=(1, 1000))
    min_snr: float = F(30.0, "Minimum S/N of a PSF star.", range=(1.0, None))
    fallback_min_snr: float = F(
        15.0, "When fewer than min_stars stars reach min_snr (a sparse field), stars down to "
        "this S/N are used instead.", range=(1.0, None))
    isolation_fwhm: float = F(4.0, "Neighbour-free radius around a PSF star, in FWHM.",
                              range=(0.0, 50.0))
    edge_px: int = F(16, "Stars closer than this to an edge are not used.", range=(0, 1024))
    stamp_half_px: int = F(0, "Half size of the fit stamp; 0: 2.5 x the first-guess FWHM.",
                           range=(0, 64))
    grid: int = F(3, "The field is split in grid x grid regions for per-region PSF.",
                  range=(1, 16))


@dataclass
class StampsConfig:
    """Normalised star stamps stored for the SOM."""

    size_px: int = F(32, "Stamp side (pixels).", range=(8, 128))
    per_detector: int = F(64, "Stamps kept per detector (brightest usable stars).",
                          range=(1, 4096))

    def check(self, prefix: str) -> None:
        """Stamps have an even side."""
        if self.size_px % 2:
            raise ValueError(f"{prefix}size_px must be even")


@dataclass
class SomConfig:
    """Self-organizing map of star stamps (the learned classifier's stamp summary)."""

    grid_nodes: int = F(10, "Nodes along each side of the square map.", range=(2, 64))
    sigma_nodes: float | None = F(
        None, "Initial neighbourhood radius in nodes; None: a third of the side.",
        range=(0.1, 64.0))
    learning_rate: float = F(0.5, "Initial learning rate (asymptotic decay).",
                             range=(1e-4, 10.0))
    passes: int = F(5, "Training updates, in passes over the training stamps.",
                    range=(1, 1000))
    max_stamps: int = F(50_000, "At most this many stamps (a random subset) train the map.",
                        range=(100, None))
    augment: bool = F(True, "Rotate and flip the training stamps at random so that every "
                            "direction of elongation is represented.")
    representatives: int = F(4, "Representative stamps stored per detector in the Zarr store: "
                                "one real stamp of each of the busiest SOM nodes.",
                             range=(1, 64))


@dataclass
class ClassifyConfig:
    """Rule classifier thresholds (quality-classes.md); a survey overrides these."""

    seeing_limit_arcsec: float = F(1.4, "FWHM above which a frame is bad_seeing.",
                                   range=(0.1, 20.0))
    seeing_limit_px: float | None = F(
        None, "Seeing limit used when the pixel scale is unknown. None: no seeing flag then.",
        range=(0.5, 100.0))
    trail_ratio_bad: float = F(0.75, "Trail ratio T/s from which tracking is bad.",
                               range=(0.1, 10.0))
    trail_ratio_very_bad: float = F(3.0, "Trail ratio from which tracking is very bad.",
                                    range=(0.5, 50.0))
    jump_ratio_very_bad: float = F(
        2.0, "When every star is seen twice (a pointing jump, qa flag DOUBLED_STARS), the "
        "separation over the seeing FWHM from which tracking is very bad.", range=(0.5, 50.0))
    min_coherence: float = F(
        0.6, "Elongation must point the same way over the field (0: random, 1: all the "
        "same) to count as a tracking error; optics give low coherence.", range=(0.0, 1.0))
    nonuniformity_limit: float = F(0.06, "Sky (P99-P1)/median above which the background "
                                         "is flagged.", range=(0.0, None))
    softness: float = F(0.15, "Relative width of the soft threshold that turns margins into "
                              "probabilities.", range=(0.01, 1.0))
    extinction_spread_limit_mag: float = F(
        0.25, "Extinction spread k (mag, P99 - P1 over the detector, measured against the "
        "field's other frames) from which a frame is background_issues (quality-classes.md).",
        range=(0.0, None))
    transparency_loss_limit_mag: float = F(
        0.3, "Transparency loss (mag, stars fainter than on the field's clearest frames) from "
        "which a frame is background_issues (thin, uniform cloud). 0.3 mag (a quarter of the "
        "light) is where Gemini's cloud-cover bands end the thin-cirrus band CC70 (0.08-0.3 "
        "mag); it is well above the measurement's noise (~0.01 mag) and above the change "
        "of airmass over a field's usual night (0.1-0.2 mag), which it does not correct.",
        range=(0.0, None))

    def check(self, prefix: str) -> None:
        """Very bad tracking starts above bad tracking."""
        if self.trail_ratio_very_bad <= self.trail_ratio_bad:
            raise ValueError(f"{prefix}trail_ratio_very_bad must exceed "
                             f"{prefix}trail_ratio_bad")


@dataclass
class SequenceConfig:
    """The night as a sequence: frames of one field grouped, matched and compared."""

    enabled: bool = F(True, "Group the night's frames by field and measure each against "
                            "its field's other frames (transparency, k, shift, rotation).")
    min_frames: int = F(
        5, "Fewest measured frames of a field for the cross-frame columns; a smaller field "
        "gets its field id and the qa flag FEW_FIELD_FRAMES.", range=(2, None))
    field_radius: float = F(
        0.5, "Frames are of one field when their centres lie within this fraction of the "
        "detector's field of view of each other (WCS or pointing keywords).",
        range=(0.01, 10.0))
    min_snr: float = F(10.0, "Sources at this S/N or more (not saturated, truncated, "
                             "blended or compact) are the stars matched and compared.",
                       range=(1.0, None))
    max_stars: int = F(1000, "At most this many of a frame's brightest such stars are "
                             "compared.", range=(10, None))
    control_stars: int = F(30, "The brightest stars whose patterns astroalign matches (a "
                                "failed match costs about its square in time).",
                           range=(5, 500))
    match_tolerance_px: float = F(2.0, "Largest distance (pixels) between a reference star "
                                       "and a matched star carried onto it.",
                                  range=(0.1, 50.0))
    pattern_tries: int = F(
        4, "A frame without pointing or OBJECT is matched against the references of at "
        "most this many fields before it starts a field of its own (bounds the time on a "
        "night of unrelated frames).", range=(0, 1000))
    best_share: float = F(0.25, "Share of a field's frames (the most transparent) that "
                                "define zero transparency.", range=(0.01, 1.0))
    map_scale: float = F(
        0.08, "Smoothing of the extinction map behind k: Gaussian kernel sigma as a "
        "fraction of the detector's longer side. Smaller follows smaller patches but "
        "leaves more noise on sparse fields (10-50 stars); 0.12 smoothed half the patchy "
        "simulated frames below the limit.", range=(0.01, 1.0))


@dataclass
class AutoencoderConfig:
    """Autoencoder scoring of image patches (Jia et al. 2024)."""

    enabled: bool = F(True, "Score every detector with the autoencoder when weights exist.")
    weights: str | None = F(None, "Weights file (.safetensors); None: the packaged weights.")
    bin_factor: int = F(4, "Bin the frame by this factor before scoring (CPU speed). Used "
                           "in training; scoring uses the value stored with the weights.",
                        range=(1, 16))
    patch_px: int = F(32, "Patch side on the binned frame (pixels). Used in training; "
                          "scoring uses the value stored with the weights.", range=(8, 512))
    threshold_quantile: float = F(
        0.995, "Mask threshold: this quantile of the reference (good-frame) patch scores, "
        "stored with the weights.", range=(0.5, 1.0))
    close_px: int = F(1, "Morphological opening/closing radius on the patch grid that "
                         "removes isolated masked patches and fills holes.", range=(0, 16))
    write_fits_masks: bool = F(False, "Also write masks as FITS under <out-root>/masks/.")
    base_channels: int = F(32, "Training: feature channels of the network after its "
                               "space-to-depth fold (scoring time grows with it).",
                           range=(4, 256))
    latent_channels: int = F(8, "Training: channels of the latent map (one cell per 8x8 "
                                "binned pixels).", range=(1, 256))
    reference_min_p_good: float = F(
        0.8, "Training: a catalog row is a reference frame when its class is good, its "
        "status ok and p_good at least this.", range=(0.0, 1.0))
    patches_per_frame: int = F(64, "Training: random patches drawn from each reference "
                                   "frame per epoch.", range=(1, 100_000))
    max_reference_frames: int = F(200, "Training: at most this many reference frames "
                                       "(detectors) are read, drawn at random.",
                                  range=(2, 1_000_000))


@dataclass
class TrainConfig:
    """Lightning Trainer options shared by the training commands."""

    accelerator: str = F("cpu", "Lightning accelerator: cpu, gpu, auto.",
                         choices=("cpu", "gpu", "cuda", "auto"))
    devices: int = F(1, "Devices (processes) per node.", range=(1, 64))
    num_nodes: int = F(1, "Nodes.", range=(1, 1024))
    strategy: str = F("auto", "Lightning strategy: auto, ddp, ddp_spawn...")
    precision: str = F("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed.")
    max_epochs: int = F(20, "Training epochs.", range=(1, 100_000))
    batch_size: int = F(64, "Batch size per device.", range=(1, 1_000_000))
    learning_rate: float = F(1e-3, "Adam learning rate.", range=(1e-7, 1.0))
    num_workers: int = F(0, "DataLoader worker processes.", range=(0, 256))
    seed: int = F(0, "Seed for weights, data order and splits.", range=(0, None))
    checkpoint_dir: str = F("checkpoints", "Where checkpoints are written; a run resumes "
                                           "from last.ckpt there.")
    val_fraction: float = F(0.2, "Share of exposures (whole nights where there are "
                                 "several) held out for validation.", range=(0.0, 0.9))


@dataclass
class SlurmConfig:
    """dask-jobqueue SLURMCluster settings (one worker job per SLURM job)."""

    queue: str | None = F(None, "Partition (#SBATCH -p).")
    account: str | None = F(None, "Account (#SBATCH -A).")
    cores: int = F(2, "Cores per worker job.", range=(1, 512))
    processes: int = F(1, "Dask worker processes per job.", range=(1, 512))
    memory: str = F("4GiB", "Memory per worker job.")
    walltime: str = F("01:00:00", "Walltime per worker job.")
    job_extra_directives: list = F([], "Extra #SBATCH lines, e.g. ['--qos=low'].")
    interface: str | None = F(None, "Network interface for scheduler and workers "
                                    "(e.g. 'ib0'; 'lo' for a single machine).")
    local_directory: str | None = F(None, "Worker scratch directory (node-local disk).")
    min_jobs: int = F(0, "Adaptive scaling: fewest worker jobs.", range=(0, 10_000))
    max_jobs: int = F(4, "Adaptive scaling: most worker jobs.", range=(1, 10_000))
    log_directory: str | None = F(None, "Where SLURM writes worker job logs.")
    job_name: str = F("survey-qa-worker", "SLURM job name of the worker jobs (#SBATCH -J).")
    python: str | None = F(None, "Python that runs the workers on the compute nodes; None: "
                                 "the Python running survey-qa.")
    job_script_prologue: list = F(
        ["export OMP_NUM_THREADS=1"], "Shell lines run before the worker starts, e.g. "
        "'module load ...'; OMP_NUM_THREADS=1 keeps each task on its own core.")
    death_timeout_s: float = F(120.0, "Seconds a worker waits for an unreachable scheduler "
                                      "before it exits (and its job ends).",
                               range=(1.0, 86_400.0))

    def check(self, prefix: str) -> None:
        """What SLURM and dask-jobqueue would refuse, found before anything is submitted:
        memory size, walltime, ``#SBATCH`` options, job name and job sizes."""
        if _memory_bytes(self.memory, f"{prefix}memory") < 1024**2:
            raise ValueError(f"{prefix}memory: {self.memory!r} is less than 1 MiB")
        if not SLURM_WALLTIME.match(self.walltime.strip()):
            raise ValueError(f"{prefix}walltime: {self.walltime!r} is not a SLURM time "
                             "(e.g. '01:30:00' or '2-00:00:00')")
        for line in self.job_extra_directives:
            if not isinstance(line, str) or not line.strip().startswith("-"):
                raise ValueError(f"{prefix}job_extra_directives: {line!r} is not an "
                                 "sbatch option such as '--qos=low'")
        for line in self.job_script_prologue:
            if not isinstance(line, str):
                raise ValueError(f"{prefix}job_script_prologue: {line!r} is not a string")
        if not self.job_name or re.search(r"\s", self.job_name):
            raise ValueError(f"{prefix}job_name: {self.job_name!r} must be one word")
        if self.min_jobs > self.max_jobs:
            raise ValueError(f"{prefix}min_jobs must not exceed {prefix}max_jobs")
        if self.processes > self.cores:
            raise ValueError(f"{prefix}processes must not exceed {prefix}cores")
        if self.cores % self.processes:
            raise ValueError(f"{prefix}cores ({self.cores}) must be a multiple of "
                             f"{prefix}processes ({self.processes})")


@dataclass
class ClusterConfig:
    """Where the nightly job runs."""

    kind: str = F("local", "'local' (a Dask LocalCluster) or 'slurm' (dask-jobqueue).",
                  choices=CLUSTER_KINDS)
    workers: int = F(0, "Local worker processes (0: one per core); with kind 'slurm', a "
                        "fixed number of worker jobs (0: adaptive between slurm.min_jobs and "
                        "slurm.max_jobs).", range=(0, 4096))
    threads_per_worker: int = F(1, "Threads per local worker.", range=(1, 256))
    memory_limit: str = F("auto", "Memory limit per local worker.")
    dashboard_address: str | None = F(
        ":0", "Dask dashboard address; ':0' takes a free port (printed on start), None "
        "disables it.")
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self, prefix: str) -> None:
        """The local worker memory limit is 'auto', '0' or a memory size."""
        if self.memory_limit not in ("auto", "0"):
            _memory_bytes(self.memory_limit, f"{prefix}memory_limit")


@dataclass
class RunConfig:
    """The nightly run: where frames are read and outputs written."""

    raw_root: str = F("data/raw", "Folder holding one sub-folder of FITS frames per night.")
    out_root: str = F("data/qa", "Folder receiving catalogs/ and arrays/.")
    force: bool = F(False, "Redo exposures already done.")
    classifier: str = F(
        "auto", "'cnn': the learned classifier; 'rules': the transparent threshold classifier; "
        "'auto': cnn when its weights exist, else rules.", choices=("auto", "cnn", "rules"))
    classifier_weights: str | None = F(
        None, "Learned classifier weights (.safetensors); None: the packaged weights.")
    progress: bool = F(True, "Show a progress bar.")
    min_free_mb: float = F(
        200.0, "Free space (MiB) the out-root must have before a night starts.",
        range=(0.0, None))


@dataclass
class Config:
    """The whole configuration tree."""

    run: RunConfig = field(default_factory=RunConfig)
    io: IOConfig = field(default_factory=IOConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    stamps: StampsConfig = field(default_factory=StampsConfig)
    som: SomConfig = field(default_factory=SomConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "Config":
        """Check every field and each block's cross-field rules; raise ValueError on the
        first fault. :func:`load_config` runs it once, on the finished tree."""
        validate_block(self, "")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_block(block: Any, prefix: str) -> None:
    """Check a configuration block and the blocks inside it.

    Each field is checked against its type, range and choices, then the block's own
    cross-field rules run (its ``check(prefix)`` method, where it has one).

    Parameters
    ----------
    block
        A configuration dataclass: the whole :class:`Config` or one of its blocks (a block
        built in code, e.g. ``validate_block(ClusterConfig(kind="slurm"), "cluster.")``).
    prefix
        The block's place in the tree, ending in a dot (``"cluster."``), or ``""`` for the
        whole tree; error messages name fields with it.

    Raises
    ------
    ValueError
        On the first field or rule that fails, naming the field.
    """
    hints = typing.get_type_hints(type(block))
    for f in dataclasses.fields(block):
        name = f"{prefix}{f.name}"
        value = getattr(block, f.name)
        if dataclasses.is_dataclass(value):
            validate_block(value, name + ".")
            continue
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"{name}: {value!r} is not a {hints[f.name]}")
        lo, hi = f.metadata.get("range") or (None, None)
        if value is not None and not isinstance(value, (str, list, bool)):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ValueError(f"{name}: {value!r} outside [{lo}, {hi}]")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{name}: {value!r} not one of {choices}")
    check = getattr(block, "check", None)
    if check is not None:
        check(prefix)


def _memory_bytes(text: str, name: str) -> int:
    """Bytes of a memory size such as '4GiB' (dask's parser, as the cluster uses it)."""
    from dask.utils import parse_bytes

    try:
        n_bytes = parse_bytes(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: {text!r} is not a memory size such as '4GiB'") from exc
    if n_bytes <= 0:
        raise ValueError(f"{name}: {text!r} must be positive")
    return n_bytes


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _merge(block: Any, updates: dict, prefix: str = "") -> Any:
    """Return a copy of a dataclass block with nested ``updates`` applied."""
    names = {f.name for f in dataclasses.fields(block)}
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ValueError(f"unknown configuration key {prefix}{key!r}")
        current = getattr(block, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} must be a mapping")
            value = _merge(current, value, f"{prefix}{key}.")
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        changes[key] = value
    return dataclasses.replace(block, **changes)


def load_config(path: str | os.PathLike | None = None,
                overrides: dict | None = None) -> Config:
    """Build the configuration: defaults, then the YAML file, then ``overrides``.

    Parameters
    ----------
    path
        A YAML file; when None, ``$SURVEY_QA_CONFIG`` is used if set.
    overrides
        Nested mapping applied last (the command line), e.g. ``{"run": {"force": True}}``.

    Raises
    ------
    ValueError
        On an unknown key, a wrong type, a value out of range or a cross-field conflict.
    """
    cfg = Config()
    path = path or os.environ.get("SURVEY_QA_CONFIG")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"configuration file {path}: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"configuration file {path} is not valid YAML{at}: "
                             f"{problem}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the configuration must be a mapping")
        cfg = _merge(cfg, data)
    if overrides:
        cfg = _merge(cfg, overrides)
    return cfg.validate()


def describe(block: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(name, default, doc) for every field: the reference table of the README."""
    block = Config() if block is None else block
    rows = []
    for f in dataclasses.fields(block):
        value = getattr(block, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("doc", "")))
    return rows
