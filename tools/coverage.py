"""Which image classifiers convert: every keras.applications constructor and the keras-hub families.

Each model is built with random weights at a small size (nothing is
downloaded) and put through ``tests/zoo_cases.check_classifier``: ``convert``
with both heads (``window`` verified against the source), the map size equal
to ``geometry(fcn).output_size`` at a larger size, and ``predict_map`` equal to
the FCN's own output. A `ConversionError` is recorded with its message (it
must name the layer that blocks the conversion); anything else is a failure.
A model whose map `predict_map` computes windowed by default (it does not
convert, or its FCN pools over the whole image) is also put through
``check_windowed``: its windowed map equals the classifier on every crop.

    python tools/coverage.py --results coverage.jsonl            # run what is not in the file yet
    python tools/coverage.py --results coverage.jsonl --page docs/coverage.md   # and write the table

Results are appended to ``--results`` one JSON line per model as they come, so
an interrupted run resumes where it stopped. ``--page`` replaces the text
between ``<!-- coverage:start -->`` and ``<!-- coverage:end -->``.

Exit code: 0 when every model converted or was refused by name, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
from zoo_cases import (  # noqa: E402
    APPLICATIONS,
    HUB_BUILDERS,
    application,
    check_classifier,
    check_windowed,
    family_of,
    hub_classifier,
)

import keras_fcn_surgery as kfs  # noqa: E402

START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def cases(only=None) -> list[tuple[str, str]]:
    """``(source, name)`` of every model, keras-hub first (quick), then keras.applications smallest first."""
    listed = [("keras-hub", family) for family in HUB_BUILDERS]
    # Round-robin over the families, so the small members all come before the large ones.
    by_family = [names for names in APPLICATIONS.values()]
    for rank in range(max(map(len, by_family))):
        listed += [("keras.applications", names[rank]) for names in by_family if rank < len(names)]
    if only:
        listed = [case for case in listed if case[1] in only]
    return listed


def run_case(source: str, name: str) -> dict:
    started = time.perf_counter()
    record = {"source": source, "name": name}
    try:
        model = hub_classifier(name) if source == "keras-hub" else application(name)
        record["class"] = type(model).__name__
        try:
            outcome = check_classifier(model, name=name)
            record.update(
                result="converted",
                input_size=list(outcome.input_size),
                stride=list(outcome.stride or ()),
                exact_geometry=outcome.exact_geometry,
            )
        except kfs.ConversionError as error:
            record.update(result="refused", message=str(error))
        from keras_fcn_surgery.inference import windowed

        record["method"] = windowed.choose_method(model, None, "auto")[0]
        if record["method"] == "windowed":
            # On logits: random weights make 1000 softmax probabilities all but equal (check_windowed says so).
            checked = model if source == "keras-hub" else application(name, logits=True)
            record["windowed_stride"] = list(check_windowed(checked)[1])
            record.setdefault("input_size", [int(d) for d in model.inputs[0].shape[1:3]])
    except kfs.ConversionError as error:
        record.update(result="refused", message=str(error))
    except Exception as error:  # noqa: BLE001 - every failure is recorded, none stops the run
        record.update(result="failure", message=f"{type(error).__name__}: {error}")
    record["seconds"] = round(time.perf_counter() - started, 1)
    keras.backend.clear_session()
    gc.collect()
    return record


def read_results(path: str) -> dict:
    results = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    results[(record["source"], record["name"])] = record
    return results


def _versions() -> str:
    import tensorflow as tf

    try:
        import keras_hub

        hub = keras_hub.__version__
    except ImportError:  # pragma: no cover - keras-hub is in the test extra
        hub = "not installed"
    return f"Keras {keras.__version__}, keras-hub {hub}, TensorFlow {tf.__version__}"


def _blocking(message: str) -> str:
    first = message.split(";")[0].split(". ")[0]
    return first.replace("|", "\\|")


def table(results: dict) -> str:
    """The coverage page's table: a summary line and one row per model (those not run yet say so)."""
    everything = {case: {"source": case[0], "name": case[1], "result": "not run", "seconds": ""} for case in cases()}
    everything.update(results)
    rows = [r for key, r in sorted(everything.items(), key=lambda item: _order(item[0]))]
    apps = [r for r in rows if r["source"] == "keras.applications"]
    hub = [r for r in rows if r["source"] == "keras-hub"]
    converted = sum(r["result"] == "converted" for r in apps)
    apps_windowed = sum(r.get("method") == "windowed" for r in apps)
    windowed = [r for r in hub if r.get("method") == "windowed"]
    fcns = [r for r in hub if r["result"] == "converted" and r.get("method") == "fcn"]
    hub_line = (
        f"keras-hub `*ImageClassifier` tasks: {sum(r['result'] == 'converted' for r in hub)} of {len(hub)} "
        "families convert; the others are refused by name (rows below)."
    )
    if any("method" in r for r in hub):
        hub_line = (
            f"keras-hub `*ImageClassifier` tasks: **{len(fcns) + len(windowed)} of {len(hub)}** families give exact "
            f"dense maps: {len(fcns)} as their FCN, {len(windowed)} windowed (`predict_map`'s default where the "
            "classifier does not convert or its FCN pools over the whole image: its output on every crop, checked "
            "against the crops)."
        )
    lines = [
        f"Generated by `python tools/coverage.py` with {_versions()}; random weights, small input sizes.",
        "",
        f"keras.applications: **{converted} of {len(apps)}** constructors convert with both heads, verify, "
        "and give the map size `geometry` predicts; `predict_map` equals the FCN at a larger size"
        + (
            f"; {apps_windowed} of them pool over the whole image (squeeze-and-excitation), so their exact map is "
            "windowed, checked against the classifier on every crop."
            if any("method" in r for r in apps)
            else "."
        ),
        hub_line,
        "",
        "| Source | Model | Input | Result | Stride | Exact geometry | Seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["result"] == "converted":
            size = "x".join(map(str, r["input_size"]))
            stride = "x".join(map(str, r["stride"]))
            result, exact = "converts, verified", "yes" if r["exact_geometry"] else "no"
            if r.get("method") == "windowed":
                result += "; exact map windowed (its FCN pools over the whole image)"
        elif r["result"] == "not run":
            size, stride, exact, result = "", "", "", "not run yet"
        else:
            size, stride, exact = "", "", ""
            result = ("refused: " if r["result"] == "refused" else "**FAILURE**: ") + _blocking(r["message"])
            if r.get("method") == "windowed":
                size, stride = ("x".join(map(str, r[key])) for key in ("input_size", "windowed_stride"))
                result = f"exact map windowed (no FCN: {_blocking(r['message'])})"
        lines.append(f"| {r['source']} | {r['name']} | {size} | {result} | {stride} | {exact} | {r['seconds']} |")
    return "\n".join(lines)


def _order(key):
    source, name = key
    if source == "keras-hub":
        return (0, list(HUB_BUILDERS).index(name) if name in HUB_BUILDERS else 99, name)
    family = family_of(name)
    return (1, list(APPLICATIONS).index(family), APPLICATIONS[family].index(name))


def write_page(path: str, body: str) -> None:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers; add them where the table goes.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{head}{START}\n{body}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="coverage.jsonl", help="JSON-lines file of results (appended)")
    parser.add_argument("--page", default=None, help="Markdown page to write the table into (docs/coverage.md)")
    parser.add_argument("--only", nargs="*", default=None, help="model names (constructors or keras-hub families)")
    parser.add_argument("--rerun", action="store_true", help="run models already in the results file again")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = read_results(args.results)
    for source, name in cases(args.only):
        if (source, name) in results and not args.rerun:
            continue
        record = run_case(source, name)
        results[(source, name)] = record
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"{source:19s} {name:20s} {record['result']:9s} {record['seconds']:7.1f}s "
              f"{record.get('message', '')[:160]}", flush=True)
    if args.page:
        write_page(args.page, table(results))
    failures = [r for r in results.values() if r["result"] == "failure"]
    print(f"{len(results)} models: " + ", ".join(
        f"{sum(r['result'] == kind for r in results.values())} {kind}" for kind in ("converted", "refused", "failure")
    ))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
