"""`atlas dissect` (unit labels: network dissection on a probe, selectivity for the data's own labels) and
`atlas probe` (making a probe), see docs/dissect.md."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_quiet_option, add_ray_options
from pipeline.dissect.settings import DISSECT_OPTIONS
from pipeline.options import add_arguments, option_values


def register(sub: argparse._SubParsersAction) -> None:
    dissect = sub.add_parser(
        "dissect",
        help="unit labels: network dissection on a probe of concept masks (IoU), "
        "and selectivity for the data set's own labels",
    )
    dissect.add_argument("run")
    dissect.add_argument(
        "--layers", help="comma-separated recorded layers (default: every recorded layer with a spatial map)"
    )
    add_arguments(dissect, DISSECT_OPTIONS)  # --probe, --batch-size: one declaration each (dissect/settings.py)
    add_ray_options(
        dissect,
        actors="model replicas (default: as atlas scan)",
        threads="torch threads per CPU model actor",
        device="as atlas scan --device",
    )
    add_quiet_option(dissect)
    dissect.set_defaults(func=run)

    probe = sub.add_parser("probe", help="make a dissection probe (docs/dissect.md)")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True)
    broden = probe_sub.add_parser("broden", help="convert Broden's directory layout (index.csv, c_*.csv, images/)")
    broden.add_argument("broden", help="the Broden folder (holding index.csv)")
    broden.add_argument("--out", required=True, help="probe folder to write")
    broden.add_argument("--max-images", type=int, help="convert only the first N rows of index.csv")
    broden.set_defaults(func=run_probe_broden)


def run(args: argparse.Namespace) -> int:
    from pipeline.dissect.runner import DissectConfig, dissect_run

    record = dissect_run(
        DissectConfig(
            run=args.run,
            layers=args.layers,
            address=args.address,
            progress=not args.quiet,
            **option_values(DISSECT_OPTIONS, args),
        )
    )
    from pipeline.store import DISSECT

    print(f"dissect: {args.run}/{DISSECT}/ (query the views labels, concepts, selectivity)")
    if record["probe"]:
        print(
            f"  probe {record['probe']['name']}: {record['probe']['images']} images, "
            f"{record['probe']['concepts']} concepts; units labelled (IoU > {record['iou_cutoff']}):"
        )
        for layer in record["layers"]:
            counts = record["labelled_units"].get(layer, {})
            text = ", ".join(f"{n} {category}" for category, n in sorted(counts.items())) or "none"
            print(f"    {layer}: {text}")
    print(
        f"  label selectivity: {record['selectivity']['rows']} (unit, label) rows"
        + ("" if record["selectivity"]["auroc"] else " (precision only: AUROC needs a scan with --record all)")
    )
    return 0


def run_probe_broden(args: argparse.Namespace) -> int:
    from pipeline.dissect.broden import convert_broden

    report = convert_broden(args.broden, args.out, max_images=args.max_images)
    print(
        f"probe: {args.out} ({report['images']} images, {report['concepts']} concepts in "
        f"{', '.join(report['categories'])})"
    )
    return 0
