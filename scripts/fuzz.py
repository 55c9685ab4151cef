"""``make fuzz N=...``: run the soundness properties on N random models and print the counts.

    python -m scripts.fuzz --examples 2000 [--seed 0] [--save DIR]

Every violation is counted by category (see ``tests/fuzz/properties.py``); with ``--save`` the model
of each failing example is written to DIR with a JSON note of what failed. Exit status 1 when any
violation was found.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from onnx import helper

from tests.fuzz.generate import CONSTRUCTS, Case, cases
from tests.fuzz.oracle import executed_ranges
from tests.fuzz.properties import CATEGORIES, FINETUNE_VARIANTS, FINETUNE_REFUSED, LAYER_DELTAS, TILES, check_case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="folder for failing models (model + JSON note)")
    parser.add_argument("--markdown", type=Path, help="append the command and the counts to this file (a code block)")
    parser.add_argument("--every", type=int, default=100, help="progress line every this many examples")
    parser.add_argument("--replay", type=Path, metavar="STEM", help="re-check one saved case (STEM.onnx + STEM.json)")
    parser.add_argument("--minimize", metavar="CONSTRUCT", choices=sorted(CONSTRUCTS) + ["none"],
                        help="allow only this generator switch ('none': none of them), stop at the first violation "
                        "of --category and let hypothesis shrink it; the smallest case goes to --save/minimal_CONSTRUCT")
    parser.add_argument("--category", choices=sorted(CATEGORIES), help="with --minimize: the violation to shrink")
    parser.add_argument("--lower", action="store_true", help="also check property (f): `lower` of project's output "
                        "(QONNX cases; several seconds each)")
    parser.add_argument("--finn-lowerable", action="store_true", help="draw only models FINN's lowering takes (no "
                        "generator switch but those in FINN_LOWERABLE, QONNX activations with zero point 0 and ROUND, "
                        "no ConvTranspose) and check property (f) on each (implies --lower): most of them lower, so "
                        "(f) executes many MVAU/VVAUs")
    parser.add_argument("--allocate", action="store_true", help="also check `allocate`'s map in property (h) "
                        "(QONNX cases FINN lowers, Q/DQ cases under --cost acc-bits; several seconds each)")
    parser.add_argument("--tile", action="store_true", help="also check property (i): `project --tile T` (T drawn "
                        "per example from 1 to 6), every K-tile and running sum executed within its recorded width")
    parser.add_argument("--finetune", action="store_true", help="also check property (g): `finetune` at project's P "
                        "with a method and options drawn per example (QONNX cases; the generator leaves out the constructs "
                        "finetune refuses by name)")
    parser.add_argument("--data", action="store_true", help="also check property (j): `verify --data` on random "
                        "inputs counts exactly the overflows the executed accumulators on them have")
    args = parser.parse_args()
    args.lower = args.lower or args.finn_lowerable
    warnings.filterwarnings("ignore")
    if args.replay:
        return replay(args.replay, args.lower, args.finetune, args.allocate)
    if args.minimize:
        return minimize(args.minimize, args.category, args.examples, args.seed, args.save or Path("."))
    counts: Counter = Counter()
    examples_with: Counter = Counter()
    by_switch: Counter = Counter()  # failing examples per generator switch they exercise
    stats = Counter()
    checked: Counter = Counter()  # what the properties compared
    start = time.time()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(case=cases(exclude=FINETUNE_REFUSED if args.finetune else frozenset(), finn_lowerable=args.finn_lowerable),
           verify_delta=st.integers(-2, 0),
           project_delta=st.integers(0, 3), variant=st.sampled_from(FINETUNE_VARIANTS), layer_deltas=LAYER_DELTAS,
           tile=TILES)
    def run(case, verify_delta, project_delta, variant, layer_deltas, tile):
        stats["examples"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            try:
                outcome = check_case(case, Path(tmp), verify_delta, project_delta, lower=args.lower,
                                     finetune=variant if args.finetune else None, layer_deltas=tuple(layer_deltas),
                                     allocate=args.allocate, tile=tile if args.tile else None, data=args.data)
            except Exception as err:  # noqa: BLE001 - a fuzzer bug must not end a long run; it is counted and shown
                stats["oracle_errors"] += 1
                print(f"fuzzer error (example skipped): {type(err).__name__}: {err}", file=sys.stderr)
                if args.save:  # the model and its description, to find the fuzzer's own bug
                    case.save(args.save / f"fuzzer_error_{stats['oracle_errors']:05d}", {"error": str(err)})
                return
            stats["commands"] += outcome.commands
            checked.update(outcome.checked)
            for switch in case.used:
                stats[f"uses {switch}"] += 1
            stats["integer_layers"] += sum(info.integer for info in case.layers)
            for command, code in outcome.exit_codes.items():
                stats[f"{command} exit {code}"] += 1
            for category in {f.category for f in outcome.failures}:
                examples_with[category] += 1
            for switch in (case.used or {"(none)"}) if outcome.failures else ():
                by_switch[switch] += 1
            counts.update(f.category for f in outcome.failures)
            if outcome.failures and args.save:
                n = stats["saved"] = stats["saved"] + 1
                case.save(args.save / f"case_{n:05d}", {"failures": [f.__dict__ for f in outcome.failures],
                                                        "deltas": [verify_delta, project_delta],
                                                        "layer_deltas": list(layer_deltas),
                                                        "tile": tile if args.tile else None,
                                                        "finetune": variant if args.finetune else None})
        if stats["examples"] % args.every == 0:
            found = ", ".join(f"{k}={v}" for k, v in sorted(examples_with.items())) or "none"
            print(f"[{stats['examples']}/{args.examples}] {time.time() - start:.0f}s; examples with violations: {found}",
                  flush=True)

    run()
    elapsed = time.time() - start
    report = [f"{stats['examples']} random models, {stats['integer_layers']} integer MAC layers, "
              f"{stats['commands']} commands in {elapsed:.0f}s (seed {args.seed})",
              "exit codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()) if " exit " in k)]
    if checked:
        report.append("compared: " + ", ".join(f"{k} {v}" for k, v in sorted(checked.items())))
    used = sorted((k[5:], v) for k, v in stats.items() if k.startswith("uses "))
    if used:  # coverage: a switch no example used was not tested
        report.append("examples using each generator switch: " + ", ".join(f"{k} {v}" for k, v in used))
    if stats["oracle_errors"]:
        report.append(f"fuzzer errors (examples skipped, see stderr): {stats['oracle_errors']}")
    report.append(f"{'violation':22} {'examples':>9} {'total':>7}  meaning")
    report += [f"{category:22} {examples_with[category]:>9} {counts[category]:>7}  {meaning}"
               for category, meaning in CATEGORIES.items()]
    if by_switch:
        report.append("examples with violations, by generator switch they use ('(none)': no switch, i.e. a new bug):")
        report += [f"  {switch:32} {n:>5}" for switch, n in by_switch.most_common()]
    print("\n" + "\n".join(report))
    if args.markdown:
        command = "python -m scripts.fuzz " + " ".join(sys.argv[1:])
        with args.markdown.open("a") as handle:
            handle.write("\n```\ncommand: " + command + "\n" + "\n".join(report) + "\n```\n")
    return 1 if counts else 0


def minimize(construct: str, category: str | None, examples: int, seed_value: int, folder: Path) -> int:
    """Shrink the first violation found with only ``construct`` of the known-open ones allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"minimal_{construct}" if category is None else folder / f"minimal_{construct}_{category}"
    exclude = frozenset(CONSTRUCTS) - {construct}

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=["generate", "shrink"], report_multiple_bugs=False)
    @given(case=cases(exclude=exclude), verify_delta=st.integers(-2, 0), project_delta=st.integers(0, 3))
    def run(case, verify_delta, project_delta):
        with tempfile.TemporaryDirectory() as tmp:
            outcome = check_case(case, Path(tmp), verify_delta, project_delta)
        failures = [f for f in outcome.failures if category is None or f.category == category]
        if failures:  # hypothesis replays the smallest failing case last, so the file ends up holding it
            case.save(stem, {"failures": [f.__dict__ for f in failures], "deltas": [verify_delta, project_delta]})
            raise AssertionError("; ".join(f"{f.category}: {f.message}" for f in failures))

    try:
        run()
    except AssertionError as err:
        print(f"smallest case: {stem}.onnx\n{err}")
        return 1
    print(f"no violation in {examples} examples")
    return 0


def replay(stem: Path, lower: bool = False, finetune: bool = False, allocate: bool = False) -> int:
    """Print a saved case's graph, its executed ranges and the violations found now (``lower``: property (f) too;
    ``finetune``: (g) with the variant the case was saved with; (h) with its saved per-layer offsets, ``allocate``
    too)."""
    case = Case.load(stem)
    for node in case.model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        print(f"{node.op_type:16} {node.name:18} {list(node.input)} -> {list(node.output)} {attrs}")
    print("zero point:", case.zero_point, "input dtypes:", case.input_dtypes)
    for node, r in executed_ranges(case.model, case).items():
        print(f"executed {node}: per channel min {r.acc_min.tolist()} max {r.acc_max.tolist()}")
    note = json.loads(stem.with_suffix(".json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        outcome = check_case(case, Path(tmp), *note.get("deltas", (0, 1)), lower=lower,
                             finetune=(note.get("finetune") or "norm") if finetune else None,
                             layer_deltas=tuple(note.get("layer_deltas", ())), allocate=allocate,
                             tile=note.get("tile"))
    for failure in outcome.failures:
        print(f"{failure.category}: {failure.message}")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
