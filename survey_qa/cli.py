"""The ``survey-qa`` command: a thin layer; each command's body is one function call.

    survey-qa --night 2024-03-01 [--raw-root DIR] [--out-root DIR] [--config FILE]
              [--cluster local|slurm] [--workers N] [--force] [--demo]
    survey-qa demo [--night 2024-03-01] [...]   # simulate the demo night (once), then run it
    survey-qa simulate --night 2024-03-01 --frames 100 [--seed S] [--size 4096]
                       [--mix balanced|realistic] [--domain default|wide] [--workers N]
                       [--sequence]   # one field through the night, changing conditions
    survey-qa train autoencoder|som|classifier --out-root DIR [--night N ...] [options]
    survey-qa evaluate --out-root DIR --raw-root DIR --night N [--night N ...]
    survey-qa config            # print the configuration in force, as YAML
    survey-qa report --night N  # the night's HTML report
    survey-qa watch --night N [--until HH:MM] [--on-bad CMD]   # rate frames as they land
    survey-qa select --night N [--where EXPR | --class C] [--copy-to DIR | --link-to DIR]
    survey-qa stack --night N [--field F] [--class C | --any-class] [--where EXPR]
                    [--weighting quality|equal] [--sigma 3]   # a field's stack (FITS)
                    [--keep-damaged-sky]

Exit codes: 0 the night was processed (unreadable frames get failed rows); 2 a wrong
argument or configuration (no night folder, broken YAML...); 3 the run cannot be done in
this environment (out-root not writable or full); 4 another run holds the same night and
out-root.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import yaml

from survey_qa.config import CLUSTER_KINDS, Config, load_config
from survey_qa.pipeline.errors import RunEnvironmentError

DEMO_NIGHT = "2024-03-01"


#: ``--night`` of a command that works on one night.
ONE_NIGHT = {"required": True, "help": "YYYY-MM-DD: the folder <raw-root>/<night>"}


def command_parser(prog: str, description: str, night: dict | None = None,
                   **parser_options) -> argparse.ArgumentParser:
    """The parser of one command, with the options the commands share.

    Parameters
    ----------
    prog
        The command as typed, e.g. ``"survey-qa report"``.
    description
        What the command does (its ``--help``).
    night
        Keyword arguments of the command's ``--night`` option (:data:`ONE_NIGHT` when
        None), e.g. ``{"action": "append", "dest": "nights"}`` for a repeatable one.
    **parser_options
        Further arguments of :class:`argparse.ArgumentParser` (``epilog``).

    Returns
    -------
    argparse.ArgumentParser
        With ``--night``, ``--config``, ``--raw-root`` and ``--out-root``; the command
        adds its own options.
    """
    p = argparse.ArgumentParser(prog=prog, description=description, **parser_options)
    p.add_argument("--night", **(ONE_NIGHT if night is None else night))
    p.add_argument("--config", help="YAML configuration file (else $SURVEY_QA_CONFIG)")
    p.add_argument("--raw-root", help="folder of nights of FITS frames")
    p.add_argument("--out-root", help="folder receiving catalogs/ and arrays/")
    return p


def parse_command(p: argparse.ArgumentParser,
                  argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """The parsed arguments and the configuration they select (file, then options)."""
    a = p.parse_args(argv)
    return a, load_config(a.config, config_overrides(a))


def night_parser() -> argparse.ArgumentParser:
    """The parser of the nightly command, ``survey-qa --night N``."""
    p = command_parser(
        "survey-qa", "Rate every frame of a night: usable or not, and why.",
        epilog="Other commands: survey-qa simulate | train | evaluate | config "
               "(each with --help).")
    p.add_argument("--demo", action="store_true",
                   help="write the simulated demo night into <raw-root>/<night> first when "
                        "that folder does not exist (never without this option)")
    p.add_argument("--cluster", choices=CLUSTER_KINDS, help="where the work runs")
    p.add_argument("--workers", type=int, help="local worker processes, or SLURM worker jobs")
    p.add_argument("--force", action="store_true", default=None,
                   help="redo exposures already done")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--classifier", choices=("auto", "cnn", "rules"),
                   help="learned classifier (cnn), threshold rules, or cnn when weights exist")
    p.add_argument("--flat", metavar="FILE",
                   help="master flat field (FITS): every frame is divided by it before measuring")
    return p


def config_overrides(a: argparse.Namespace) -> dict:
    """Command-line values that were given, as a nested configuration mapping."""
    run = {k: getattr(a, k, None) for k in ("raw_root", "out_root", "force", "progress",
                                             "classifier")}
    cluster = {"kind": getattr(a, "cluster", None), "workers": getattr(a, "workers", None)}
    train = {k: getattr(a, k, None) for k in ("accelerator", "devices", "num_nodes",
                                              "strategy", "precision", "max_epochs",
                                              "checkpoint_dir")}
    tree = {"run": run, "cluster": cluster, "train": train,
            "background": {"flat": getattr(a, "flat", None)}}
    return {block: {k: v for k, v in values.items() if v is not None}
            for block, values in tree.items()}


def night_main(argv: list[str]) -> int:
    a, cfg = parse_command(night_parser(), argv)
    raw = Path(cfg.run.raw_root)
    if not (raw / a.night).is_dir():
        if not a.demo:
            raise ValueError(f"no night folder {raw / a.night} (check --night and "
                             "--raw-root; `survey-qa demo` simulates a demo night)")
        from survey_qa.flows.simulate import demo_night

        print(f"no frames in {raw / a.night}: simulating the demo night there "
              "(once, deterministic)")
        demo_night(raw, a.night)
    from survey_qa.flows.nightly import run_night

    summary = run_night(cfg, a.night)
    print(summary.report())
    from survey_qa.flows.report import try_write_report

    print(f"night report:      {try_write_report(cfg, a.night)}")
    return 0


def simulate_main(argv: list[str]) -> int:
    p = command_parser("survey-qa simulate",
                       "Write a simulated night of FITS frames with its truth table.")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=4096, help="detector side in pixels")
    p.add_argument("--ambiguous-fraction", type=float, default=0.0,
                   help="share of frames drawn from the ambiguous zones of the spec")
    p.add_argument("--mix", choices=("balanced", "realistic"), default="balanced",
                   help="the five classes in equal shares, or mostly good frames")
    p.add_argument("--domain", choices=("default", "wide"), default="default",
                   help="wide: frames as wide as real instruments (0.1-15\"/px, FWHM 1.2-20 "
                        "px, 500 px to --size, raw frames, vignetting, Bayer, defocus)")
    p.add_argument("--workers", type=int,
                   help="render on a Dask cluster of this many workers (the cluster block "
                        "of the configuration); default: in this process")
    p.add_argument("--sequence", action="store_true",
                   help="a night of --frames exposures of one field (one star and galaxy "
                        "scene) under changing seeing, transparency, patchy cloud, sky, "
                        "drift, a re-pointing and focus (--mix, --domain and "
                        "--ambiguous-fraction do not apply)")
    a, cfg = parse_command(p, argv)
    from survey_qa.flows.simulate import simulate_night, simulate_sequence

    with contextlib.ExitStack() as stack:
        client = None
        if a.workers:
            from distributed import Client

            from survey_qa.hpc.cluster import make_cluster, scale_for_night

            cluster = stack.enter_context(make_cluster(cfg.cluster))
            scale_for_night(cluster, cfg.cluster, a.frames)
            client = stack.enter_context(Client(cluster))
        if a.sequence:
            truth = simulate_sequence(Path(cfg.run.raw_root), a.night, a.frames, seed=a.seed,
                                      size_px=a.size, client=client)
        else:
            truth = simulate_night(Path(cfg.run.raw_root), a.night, a.frames, seed=a.seed,
                                   size_px=a.size, mix=a.mix, client=client,
                                   ambiguous_fraction=a.ambiguous_fraction, domain=a.domain)
    print(f"wrote {truth['exposure'].nunique()} exposures to {Path(cfg.run.raw_root) / a.night}")
    if a.sequence:
        print(f"field {truth['field'].iloc[0]}")
    print(truth.drop_duplicates("exposure")["quality_class"].value_counts().to_string())
    return 0


def train_main(argv: list[str]) -> int:
    p = command_parser(
        "survey-qa train", "Train a model on nights already processed.",
        night={"action": "append", "dest": "nights",
               "help": "night to train on (repeat); default: every night in the catalog"})
    p.add_argument("model", choices=("autoencoder", "som", "classifier"))
    p.add_argument("--accelerator")
    p.add_argument("--devices", type=int)
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--strategy")
    p.add_argument("--precision")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--som", help="classifier: the SOM file to use (default: train one)")
    p.add_argument("--output", help="where the weights go (default: the packaged location)")
    a, cfg = parse_command(p, argv)
    out = cfg.run.out_root
    if a.model == "autoencoder":
        from survey_qa.flows.train import train_autoencoder

        path = train_autoencoder(cfg, out, a.nights, output=a.output)
    elif a.model == "som":
        from survey_qa.flows.train_classifier import train_som

        path = train_som(cfg, out, a.nights, output=a.output)
    else:
        from survey_qa.flows.train_classifier import train_classifier

        path = train_classifier(cfg, out, a.nights, cfg.run.raw_root, som_path=a.som,
                                output=a.output)
    if path is not None:  # None on the non-zero ranks of a distributed run
        print(f"weights written to {path}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = command_parser(
        "survey-qa evaluate",
        "Score the learned classifier, the rule classifier and a gradient-boosting "
        "baseline against the truth tables of simulated nights.",
        night={"action": "append", "dest": "nights", "required": True})
    p.add_argument("--weights", help="classifier weights (default: the packaged ones)")
    p.add_argument("--report-dir", help="where evaluation.json and evaluation.png go")
    p.add_argument("--train-out-root", help="outputs of the training nights, for the "
                                            "gradient-boosting baseline (default: --out-root)")
    p.add_argument("--train-raw-root", help="raw root of the training nights' truth tables "
                                            "(default: --raw-root)")
    a, cfg = parse_command(p, argv)
    from survey_qa.flows.train_classifier import evaluate

    report = evaluate(cfg, cfg.run.out_root, cfg.run.raw_root, a.nights, weights=a.weights,
                      train_out_root=a.train_out_root, train_truth_root=a.train_raw_root,
                      report_dir=a.report_dir)
    print(report.text())
    return 0


def config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="survey-qa config",
                                description="Print the configuration in force as YAML.")
    p.add_argument("--config")
    a = p.parse_args(argv)
    cfg: Config = load_config(a.config)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def report_main(argv: list[str]) -> int:
    p = command_parser("survey-qa report",
                       "Write the night's HTML report (one file that opens offline) from its "
                       "catalogs and arrays.")
    p.add_argument("--output", help="the HTML file (default: <out-root>/reports/<night>.html)")
    a, cfg = parse_command(p, argv)
    from survey_qa.flows.report import write_report

    print(f"night report: {write_report(cfg, a.night, a.output)}")
    return 0


def watch_main(argv: list[str]) -> int:
    p = command_parser(
        "survey-qa watch",
        "Watch <raw-root>/<night>/ and rate each frame as soon as it is written: "
        "a verdict line, the night's catalogs and report updated.")
    p.add_argument("--until", help="stop at this time: HH:MM (UTC) or an ISO date-time")
    p.add_argument("--on-bad", metavar="CMD",
                   help="shell command run for each frame that is not good: the row as JSON "
                        "on stdin and as SURVEY_QA_* environment variables")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not rewrite the HTML report after each frame")
    p.add_argument("--classifier", choices=("auto", "cnn", "rules"))
    p.set_defaults(progress=False)  # one verdict line per frame instead of a progress bar
    a, cfg = parse_command(p, argv)
    from survey_qa.flows.watch import parse_until, watch

    summary = watch(cfg, a.night, until=parse_until(a.until), on_bad=a.on_bad,
                    report=a.report, echo=lambda line: print(line, flush=True))
    print(summary.report(), flush=True)
    return 0


def select_main(argv: list[str]) -> int:
    p = command_parser(
        "survey-qa select",
        "Choose a night's frames to stack and write them as a plain list, a CSV "
        "with weights, and lists for Siril, PixInsight and DeepSkyStacker.")
    p.add_argument("--where", help="pandas expression over catalog columns, e.g. "
                                   "\"quality_class == 'good' and fwhm_arcsec < 2.0\"")
    p.add_argument("--class", dest="classes", action="append",
                   help="keep this class (repeat for several)")
    p.add_argument("--output", help="folder for the lists (default: "
                                    "<out-root>/selections/night=<night>)")
    p.add_argument("--copy-to", help="also copy the chosen files into this folder")
    p.add_argument("--link-to", help="also link (symlink) the chosen files into this folder")
    a, cfg = parse_command(p, argv)
    from survey_qa.flows.select import select_frames

    chosen = select_frames(cfg, a.night, where=a.where, classes=a.classes, out_dir=a.output,
                           copy_to=a.copy_to, link_to=a.link_to)
    print(chosen.report())
    return 0


def stack_main(argv: list[str]) -> int:
    p = command_parser(
        "survey-qa stack",
        "Register the chosen frames of one field of a night on its best frame, scale them "
        "to its photometry, combine them with quality weights and sigma clipping, and "
        "write the stack with its provenance to <out-root>/stacks/<night>/<field>.fits.")
    p.add_argument("--field", help="the field (FIELD or OBJECT); needed when the chosen "
                                   "frames hold several")
    p.add_argument("--class", dest="classes", action="append",
                   help="stack this class (repeat for several; default: good)")
    p.add_argument("--any-class", action="store_true", help="stack frames of every class")
    p.add_argument("--where", help="pandas expression over catalog columns, as in select")
    p.add_argument("--weighting", choices=("quality", "equal"), default="quality",
                   help="quality: t^2 / (noise^2 FWHM^2) per frame (t: throughput, noise: "
                        "on a star's scale); equal: all alike")
    p.add_argument("--sigma", type=float, default=3.0,
                   help="clipping threshold in expected scatters (0: no clipping)")
    p.add_argument("--interpolation", choices=("bilinear", "cubic"), default="bilinear",
                   help="resampling onto the reference grid")
    p.add_argument("--detector", help="the detector to stack when the frames are mosaics")
    p.add_argument("--flat", metavar="FILE",
                   help="master flat field (FITS) every frame is divided by, as in the "
                        "nightly job")
    p.add_argument("--output", help="the FITS file (default: "
                                    "<out-root>/stacks/<night>/<field>.fits)")
    p.add_argument("--keep-damaged-sky", action="store_true",
                   help="use every pixel, also the sky that added light or cloud damage "
                        "(by default each frame's defect_mask is left out)")
    a, cfg = parse_command(p, argv)
    if a.any_class and a.classes:
        raise ValueError("--class and --any-class: choose one")
    from survey_qa.flows.stack import stack_field

    classes = [] if a.any_class else a.classes
    run = stack_field(cfg, a.night, field_name=a.field, classes=classes, where=a.where,
                      weighting=a.weighting, sigma=a.sigma, detector=a.detector,
                      output=a.output, interpolation=a.interpolation,
                      mask_damaged_sky=not a.keep_damaged_sky)
    print(run.report())
    return 0


def demo_main(argv: list[str]) -> int:
    """``survey-qa demo``: the nightly job on the simulated demo night."""
    if not any(a == "--night" or a.startswith("--night=") for a in argv):
        argv = ["--night", DEMO_NIGHT, *argv]
    return night_main([*argv, "--demo"])


COMMANDS = {"demo": demo_main, "simulate": simulate_main, "train": train_main,
            "evaluate": evaluate_main, "config": config_main}

COMMANDS.update(report=report_main, watch=watch_main, select=select_main, stack=stack_main)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return night_main(argv)
    except ValueError as e:  # a wrong argument or configuration: say it, exit non-zero
        print(f"survey-qa: error: {e}", file=sys.stderr)
        return 2
    except RunEnvironmentError as e:  # out-root not writable or full, night locked
        print(f"survey-qa: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
