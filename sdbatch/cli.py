"""The ``sdbatch`` command line. Heavy libraries load only in commands that render."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import SdbatchError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except SdbatchError as exc:
        print(f"sdbatch: error: {exc}" if exc.exit_code != 2 else str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sdbatch: interrupted; finished items are kept, run again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sdbatch plan ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sdbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check job files; print every problem with file:line:column")
    p.add_argument("jobs", nargs="+", metavar="JOB")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("plan", help="show the items a job expands to (no model is loaded)")
    p.add_argument("job")
    p.add_argument("--count", action="store_true", help="print only the number of items")
    p.add_argument("--limit", type=_count, default=None, help="show at most N items")
    p.add_argument("--offset", type=_count, default=0, help="start at item N")
    p.add_argument("-o", "--output", default=None, metavar="OUT_DIR",
                   help="an output folder whose timing.json gives even-timed animation frames their final positions")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("run", help="render a job; re-running it renders only what is missing")
    p.add_argument("job")
    p.add_argument("-o", "--output", default=None, help="output folder (default: out/<job name>)")
    p.add_argument("--add", action="store_true",
                   help="add to an output folder that holds another job's outputs (refused otherwise)")
    p.add_argument("--batch-size", type=_positive, default=None, help="override the job's batch_size")
    p.add_argument("--device", default=None, help="override the job's device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--limit", type=_count, default=None, help="render only the first N items of the plan")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: in this process (default); ray: actors on a Ray cluster")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start a local one")
    p.add_argument("--workers", type=_positive, default=None,
                   help="Ray render actors (default: one per GPU, else per CPU)")
    p.add_argument("--write-threads", type=_positive, default=None,
                   help="threads encoding and writing files (default: one per core; under Ray, per worker)")
    p.add_argument("--write-on", choices=["workers", "driver"], default="workers",
                   help="under Ray, where files are written: on the workers (the output folder must be shared "
                        "with them; default) or in the driver")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("status", help="progress of a run from its output folder: items, shards, failures, speed")
    p.add_argument("output", metavar="OUT_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("plugins", help="list every plugin and what it registers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_plugins)

    p = sub.add_parser("info", help="read the generation parameters back from image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true", help="print the full sdbatch record as JSON")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("report", help="write a static HTML page of a run: gallery, filters, grid, summary")
    p.add_argument("output", metavar="OUT_DIR", help="a run's output folder")
    p.add_argument("-o", "--report", default=None, help="the page to write (default: OUT_DIR/report.html)")
    p.add_argument("--thumb-size", type=int, default=256, help="longest side of embedded thumbnails (default: 256)")
    p.add_argument("--max-items", type=int, default=5000, help="items in the gallery at most (default: 5000)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("make-test-model", help="build a tiny random Stable Diffusion for offline tests")
    p.add_argument("folder")
    p.add_argument("--family", choices=("sd1", "sdxl", "sd3", "flux"), default="sd1",
                   help="model family (default sd1); sd3 is SD3.5-shaped, flux FLUX.1-dev-shaped")
    p.add_argument("--single-file", default=None, help="also write an original-layout .safetensors checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_make_test_model)
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _registry():
    from .plugins import load_registry

    registry = load_registry()
    for failure in registry.failures:
        print(f"sdbatch: warning: plugin {failure.origin} failed to load: {failure.error}", file=sys.stderr)
    return registry


def cmd_validate(args) -> int:
    from .errors import JobError
    from .job import load_job

    registry, status = _registry(), 0
    for path in args.jobs:
        try:
            job = load_job(path, registry)
        except JobError as exc:
            print(exc, file=sys.stderr)
            status = exc.exit_code
            continue
        print(f"{path}: ok, {len(job.plan)} items{_provisional_note(job)}")
    return status


def _provisional_note(job) -> str:
    """Even-timed frames get their positions from run's pre-pass; until then the plan shows uniform ones."""
    timeline = job.plan.timeline
    if timeline is None or timeline.timing != "even" or timeline.curves is not None:
        return ""
    return ("; animation frames are provisional (uniform positions): 'run' measures even timing first "
            "and saves it in OUT/timing.json")


def cmd_plan(args) -> int:
    from .job import load_job

    job = load_job(args.job, _registry())
    if args.output:
        from .timing import load_timing

        load_timing(job.plan, args.output)
    note = _provisional_note(job)
    if note and not args.count:
        print(f"sdbatch: note: {note[2:]}", file=sys.stderr)
    if args.count:
        print(len(job.plan))
        return 0
    stop = len(job.plan) if args.limit is None else args.offset + args.limit
    out = sys.stdout
    for item in job.plan.items(args.offset, stop):
        out.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    return 0


def cmd_run(args) -> int:
    from .job import load_job
    from .run import LocalExecutor

    registry = _registry()
    job = load_job(args.job, registry)
    args.output = args.output or default_output(job)
    if not args.add:
        check_output_folder(job, args.output)
    options = dict(batch_size=args.batch_size, device=args.device, quiet=args.quiet, limit=args.limit,
                   write_threads=args.write_threads)
    if args.executor == "ray":
        from .ray_executor import RayExecutor

        executor = RayExecutor(job, registry, args.output, workers=args.workers, address=args.address,
                               write_on=args.write_on, **options)
    else:
        executor = LocalExecutor(job, registry, args.output, **options)
    summary = executor.run()
    if not args.quiet:
        print(
            f"sdbatch: {summary.rendered} rendered, {summary.already_done} already done, {summary.failed} failed "
            f"of {summary.total} in {summary.seconds:.1f}s ({summary.images_per_second:.2f} images/s); "
            f"output: {args.output}",
            file=sys.stderr,
        )
        for advice in summary.notes.get("advice", []):  # plugins' hints on what to change, one line each
            print(f"sdbatch: {advice}", file=sys.stderr)
    return 1 if summary.failed else 0


def default_output(job) -> str:
    """out/<job name>: one folder per job, so jobs run without -o never mix their outputs."""
    from pathlib import Path

    from .plan import slug

    return str(Path("out") / slug(job.spec.name or Path(job.filename).stem))


def check_output_folder(job, output) -> None:
    """Refuse a folder holding another job's outputs: its manifest and job.yaml would mix with this job's.

    Jobs are told apart by ``name:``; an edited job keeps its name and resumes into its folder.
    Two unnamed jobs cannot be told apart unless their files are equal, so they are not refused.
    """
    from pathlib import Path

    import yaml

    from .output import MANIFEST

    stored = Path(output) / "job.yaml"
    if not (Path(output) / MANIFEST).is_file() or not stored.is_file():
        return
    try:
        name = (yaml.safe_load(stored.read_text()) or {}).get("name")
    except (yaml.YAMLError, AttributeError, OSError):
        name = None
    if name == job.spec.name:
        return
    shown = f"job '{name}'" if name else "an unnamed job"
    raise SdbatchError(f"{output} holds the outputs of {shown} ({stored}); give another folder with -o, "
                       f"or --add to add this job's outputs to it")


def cmd_status(args) -> int:
    from .run import run_status

    status = run_status(args.output, _registry())
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    total, done = status["total"], status["done"]
    print(f"{args.output}: job {status['job']}")
    print(f"  items:  {done}/{total} done ({100.0 * done / total if total else 100:.1f}%), {status['failed']} failed")
    dataset = status["notes"].get("dataset")
    if dataset:
        short = f", {dataset['shards_short']} short (waiting for more items)" if dataset.get("shards_short") else ""
        print(f"  shards: {dataset['shards_done']}/{dataset['shards_total']} done{short} in {dataset['url']}")
    last = status["last_run"]
    if last:
        print(f"  last run: {last.get('rendered', 0)} rendered in {last.get('seconds', 0):.1f}s "
              f"({last.get('images_per_second', 0):.2f} images/s), {last.get('failed', 0)} failed")
    return 0


def cmd_plugins(args) -> int:
    registry = _registry()
    rows = [
        {"kind": e.kind, "name": e.name, "plugin": e.origin.plugin, "package": e.origin.package,
         "version": e.origin.version, "aliases": list(e.aliases)}
        for e in registry
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = [max(len(str(r[k])) for r in rows + [dict(kind="KIND", name="NAME", plugin="PLUGIN", package="PACKAGE", version="VERSION")]) for k in ("kind", "name", "plugin", "package")]
    header = ("KIND", "NAME", "PLUGIN", "PACKAGE", "VERSION")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths + [0])).rstrip())
    for r in rows:
        cells = [r["kind"], r["name"], r["plugin"], r["package"], r["version"]]
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths + [0])).rstrip())
    for failure in registry.failures:
        print(f"FAILED  {failure.origin}: {failure.error}")
    return 0


def cmd_info(args) -> int:
    from pathlib import Path

    from PIL import Image

    from .errors import shorten
    from .inputs import input_problem
    from .metadata import read_image_metadata

    status = 0
    for path in args.images:
        try:
            problem = input_problem(Path(path))  # a FIFO or a device would never end
            if problem:
                raise ValueError(problem)
            meta = read_image_metadata(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            print(f"{path}: cannot read: {shorten(str(exc), 300)}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps({"file": path, **meta}, indent=2, ensure_ascii=False))
        elif meta["parameters"]:
            print(f"{path}:\n{meta['parameters']}\n")
        else:
            print(f"{path}: no generation parameters found", file=sys.stderr)
            status = 1
    return status


def cmd_report(args) -> int:
    from .report import write_report

    page = write_report(args.output, args.report, thumb_size=args.thumb_size, max_items=args.max_items)
    print(f"report written to {page}")
    return 0


def cmd_make_test_model(args) -> int:
    from .testfamilies import BUILDERS
    from .testmodel import build_tiny_model

    build = build_tiny_model if args.family == "sd1" else BUILDERS[args.family]
    folder = build(args.folder, seed=args.seed, single_file=args.single_file)
    print(f"tiny {args.family} test model written to {folder}" + (f" and {args.single_file}" if args.single_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
