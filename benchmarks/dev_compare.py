"""The development task of `deltatune compare`: topic classification of real quotes from Debian's `fortunes`.

Builds a 4-class text-classification task from the topic files in /usr/share/games/fortunes (install with
`apt-get install fortunes`): each quote is labelled with the file it comes from. The development topics are
education, food, law and sports; computers, politics, science and work are held out (`--held-out`) for an
independent check of the defaults chosen on the development topics. 50 training quotes per topic (200 rows)
and up to 100 test quotes per topic, chosen with a fixed seed; quotes longer than 400 characters or with fewer
than 5 words are skipped; attributions ("-- Author") are kept (they are part of the text a reader sees).

    python benchmarks/dev_compare.py [--held-out] [--build-only] [-- compare options...]
    python benchmarks/dev_compare.py --merge OUT RUN1 RUN2 ...   # one table from runs of some methods each

writes `fortunes-dev/train.jsonl`, `fortunes-dev/test.jsonl` and then runs
`deltatune compare --data .../train.jsonl --eval-data .../test.jsonl --task seq-cls --out fortunes-dev/compare`
with any options given after `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P / PYTHONSAFEPATH leave it out
from _args import unwritable_folder  # noqa: E402

FORTUNES = "/usr/share/games/fortunes"
DEV_TOPICS = ("education", "food", "law", "sports")
HELD_OUT_TOPICS = ("computers", "politics", "science", "work")


def quotes(topic: str) -> list[str]:
    """The quotes of one topic file (separated by lines holding only `%`), whitespace normalised."""
    path = os.path.join(FORTUNES, topic)
    with open(path, encoding="utf-8", errors="replace") as f:
        parts = f.read().split("\n%\n")
    out = []
    for part in parts:
        text = " ".join(part.split())
        if len(text.split()) >= 5 and len(text) <= 400:
            out.append(text)
    return sorted(set(out))


def build(
    topics: tuple[str, ...], folder: str, train_per_topic: int = 50, test_per_topic: int = 100, seed: int = 0
) -> tuple[str, str]:
    """Write `train.jsonl` and `test.jsonl` (`{"text", "label"}`) into `folder`; returns their paths."""
    if not os.path.isdir(FORTUNES):
        sys.exit(f"{FORTUNES} is missing: apt-get install -y fortunes")
    rng = random.Random(seed)
    train, test = [], []
    for topic in topics:
        rows = quotes(topic)
        rng.shuffle(rows)
        train += [{"text": t, "label": topic} for t in rows[:train_per_topic]]
        test += [
            {"text": t, "label": topic} for t in rows[train_per_topic : train_per_topic + test_per_topic]
        ]
    rng.shuffle(train)
    rng.shuffle(test)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        paths.append(path)
    print(f"{folder}: {len(train)} training and {len(test)} test quotes, topics {', '.join(topics)}")
    return paths[0], paths[1]


def merge(out: str, runs: list[str]) -> dict:
    """One results.json/report.md/table from several compare output folders (methods run separately, e.g.
    in parallel on a loaded machine); each method's own folder stays where it is."""
    from deltatune import report

    merged = None
    for folder in runs:
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        for record in results["methods"]:
            record["run_dir"] = os.path.relpath(
                os.path.join(folder, record.get("run_dir", record["method"])), out
            )
        if merged is None:
            merged = results
        else:
            merged["methods"] += results["methods"]
            merged["settings"]["lr"] |= results["settings"]["lr"]
            merged["settings"]["lr_auto"] = merged["settings"].get("lr_auto", []) + results["settings"].get(
                "lr_auto", []
            )
            merged["total_runtime_s"] += results["total_runtime_s"]
    assert merged is not None, "no runs given"
    order = ["full", "top-layers", "houlsby", "pfeiffer", "lora"]
    merged["methods"].sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    merged["merged_from"] = runs
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(merged, f, indent=2)
    report.write(merged, out)
    report.print_table(merged)
    return merged


def main() -> int:
    argv = sys.argv[1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv[:1] == ["--merge"]:
        if len(argv) < 3:
            parser.error(
                "--merge OUT RUN1 [RUN2 ...]: give the output folder and at least one compare run folder"
            )
        for run in argv[2:]:
            if not os.path.isfile(os.path.join(run, "results.json")):
                parser.error(f"--merge: {run} has no results.json (not a `deltatune compare` output folder)")
        if why := unwritable_folder(argv[1], "--merge"):
            parser.error(why)
        merge(argv[1], argv[2:])
        return 0
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser.add_argument("--held-out", action="store_true", help="the held-out topics instead of the dev ones")
    parser.add_argument("--build-only", action="store_true", help="write the data, run nothing")
    parser.add_argument("--folder", default=None, help="default fortunes-dev or fortunes-held-out")
    args = parser.parse_args(argv)
    topics = HELD_OUT_TOPICS if args.held_out else DEV_TOPICS
    folder = args.folder or ("fortunes-held-out" if args.held_out else "fortunes-dev")
    if why := unwritable_folder(folder, "--folder"):
        parser.error(why)
    train, test = build(topics, folder)
    if args.build_only:
        return 0
    from deltatune import compare

    options = ["--data", train, "--eval-data", test, "--task", "seq-cls"]
    if "--out" not in rest:
        options += ["--out", os.path.join(folder, "compare")]
    return compare.main(options + rest)


if __name__ == "__main__":
    sys.exit(main())
