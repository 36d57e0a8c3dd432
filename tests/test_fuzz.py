"""Hostile job files: mutated example jobs and crafted attacks through ``sdbatch validate``.

Every file must give exit code 0 or 2, never a traceback (a valid one also plans its first
and last items); every problem line must read
``FILE:LINE:COLUMN: KEY.PATH: message`` and stay short; each file must validate within a
time limit and a memory limit. Cases are generated from a seed, so a failure reproduces:

    .venv/bin/python tests/test_fuzz.py --cases 3000 --seed 7      # a bigger run, with figures
    SDBATCH_FUZZ_CASES=3000 pytest tests/test_fuzz.py               # the same in the suite

The generator mutates the parsed example jobs in ``jobs/`` (values replaced by hostile
ones, keys renamed, types swapped, sections wrapped or deleted) and adds text-level damage
(cut files, invalid UTF-8, control characters, alias bombs, deep nesting). Each case runs
in a worker process (``--worker``) under a memory limit; the parent kills a worker that
passes the time limit, counts a hang and starts a new one for the remaining cases.

For figures before a change, ``SDBATCH_FUZZ_CODE=FOLDER`` makes the worker import ``sdbatch`` and
``sdbatch_plugins`` from FOLDER (links to an older checkout's sdbatch/ and plugins/) instead of
this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
CI_CASES = 160
SECONDS_PER_FILE = 10.0  # generous for a shared 2-core machine; a healthy file takes milliseconds
MEMORY_LIMIT = 3 << 30  # address space of a worker
MAX_LINE = 2000  # characters in one problem line


# ---------------------------------------------------------------- hostile values
def hostile_values(rng: random.Random) -> list:
    """Values an attacker puts where a job expects something else."""
    long = rng.choice([300, 5000, 100_000])
    return [
        None, True, 0, -1, -(2 ** 70), 2 ** 70, 10 ** 400, 1e308, float("nan"), float("inf"), float("-inf"),
        "", " ", "\x00", "\t\x1b[31m", "a" * long, "é" * (long // 2), "/" * long, ("x" * 250 + "/") * 8,
        "../../../x", "/dev/zero", "/dev/urandom", "/etc/passwd", "/proc/self/mem", "/tmp", ".", "..",
        "{id:.0}../escape-{id}.png", "{id!r}", "{0}", "{", "}", "{prompt_slug:>99999999}", "{index:99999999d}",
        "{job}/../../{id}.png", "/abs/{id}.png", "{prompt_slug}/{seed}-{id}.{ext}",
        "__../x__", "__/etc/passwd__", "__*__", "__a/../../b__", "{a|b}", "{2$$a|b|c}", "{999999$$a|b}",
        "{" + "|".join(str(i) for i in range(rng.choice([50, 20_000]))) + "}",
        "".join("{a|b|c}" for _ in range(rng.choice([3, 12, 30]))),
        "0:(((9**999)**999)**999)", "0:(" + "(" * 3000 + "1" + ")" * 3000 + ")", "0:(１)", "0:(٣)",
        "0:(1e308*10)", "0:(10**1000)", "0:(t**t**t**t)", "0:(" + "+".join(["t"] * 50_000) + ")",
        ", ".join(f"{i}:({i})" for i in range(rng.choice([10, 5000]))), "999999999:(1)", "0:(", "0:)(",
        "0:(__import__('os'))", "0:(sin)", "0:(x)", "0:(1/0)", "0:(log(0))", "0:(sqrt(-1))", "0:(1 if t else 2)",
        "ｐｎｇ", "\u202epng", "png\x00", "9" * 40, "1e999", ".nan", "0x10",
        [], {}, [[]], [{}], [None], {"": None}, {"x": None}, [[[[[]]]]], {"png": {}}, ["png", "png"],
        {"from": 0, "to": 1, "steps": 10 ** 9}, {"start": 0, "count": 10 ** 15}, [1, 2, 3] * 50,
        {"kind": "prompt-difference", "pairs": [[]]}, {"kind": "prompt-difference", "pairs": [[1, 2, 3]]},
    ]


HOSTILE_KEYS = ["", "ｐｎｇ", "png\x00", "../x", "__proto__", "x" * 5000, 0, 1.5, True, "outputs ", "Outputs",
                "10000000", "1000000000", "99999999999999999999", "-1", "0x10", "０"]


def _paths(node, prefix=()):
    """Every key path in a parsed document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


def _get(node, path):
    for part in path:
        node = node[part]
    return node


def _set(root, path, value):
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


PLUGINS = {  # job key -> names a job may use there (and misspellings of them)
    "outputs": ["png", "jpeg", "jpg", "webp", "frames", "video", "xyz_grid", "webdataset", "wds", "strip",
                "directions", "control_maps", "catalogue", "PNG"],
    "conditioners": ["text", "img2img", "inpaint", "canny", "depth", "pose", "keyframes", "edit", "txt"],
    "postprocess": ["resize", "watermark", "colorgrade"],
}
OPTION_NAMES = ["path", "format", "x", "y", "z", "image", "mask", "controlnet", "strength", "scale", "fps", "audio",
                "shard_size", "url", "quality", "start", "end", "low", "high", "estimator", "threshold", "width",
                "height", "text", "clip_skip", "font_size", "margin", "compress_level", "metadata", "kind", "to",
                "from", "pairs", "count", "prompt", "seed", "easing"]


def plugin_entry(rng: random.Random, key: str):
    """A plugin use with a few options, some hostile."""
    name = rng.choice(PLUGINS[key] + HOSTILE_KEYS[:3])
    options = {rng.choice(OPTION_NAMES): rng.choice(hostile_values(rng)) for _ in range(rng.randrange(3))}
    return name if not options and rng.random() < 0.3 else {name: options}


def mutate_tree(data, rng: random.Random, donors: list):
    """One structural mutation of a parsed job."""
    if not isinstance(data, dict) or rng.random() < 0.8:
        return _mutate_node(data, rng)
    if rng.random() < 0.5:  # graft a section of another example job (animation into a grid job ...)
        donor = rng.choice(donors)
        key = rng.choice(list(donor))
        data[key] = json.loads(json.dumps(donor[key]))
        return data
    key = rng.choice(list(PLUGINS))
    uses = data.get(key) if isinstance(data.get(key), list) else []
    data[key] = uses + [plugin_entry(rng, key)]
    return data


def _mutate_node(data, rng: random.Random):
    paths = list(_paths(data))
    path = rng.choice(paths)
    node = _get(data, path)
    parent = _get(data, path[:-1]) if path else None
    op = rng.randrange(9)
    if op <= 2:
        return _set(data, path, rng.choice(hostile_values(rng)))
    if op == 3 and path and isinstance(parent, dict):
        del parent[path[-1]]
        return data
    if op == 4 and path and isinstance(parent, dict):  # rename a key: typos and hostile names
        key = path[-1]
        new = rng.choice(HOSTILE_KEYS + [str(key)[:-1], str(key) + "s", str(key).upper()])
        parent[new] = parent.pop(key)
        return data
    if op == 5:
        return _set(data, path, [node] if rng.random() < 0.5 else {"x": node})
    if op == 6 and isinstance(node, list) and node:
        return _set(data, path, {str(i): v for i, v in enumerate(node)})
    if op == 7 and isinstance(node, dict) and node:
        return _set(data, path, list(node.items()) if rng.random() < 0.5 else list(node))
    if isinstance(node, dict):
        node[rng.choice(HOSTILE_KEYS)] = rng.choice(hostile_values(rng))
        return data
    return _set(data, path, rng.choice(hostile_values(rng)))


def mutate_text(text: str, rng: random.Random) -> bytes:
    """Damage to the text: cuts, stray characters, invalid UTF-8, repeated or re-indented lines."""
    lines = text.split("\n")
    op = rng.randrange(8)
    if op >= 6 and len(lines) > 1:  # a repeated line (duplicate keys) or a line shifted out of its block
        at = rng.randrange(len(lines))
        if op == 6:
            lines.insert(at, lines[at])
        else:
            lines[at] = rng.choice(["", "  ", "    "]) + lines[at].strip()
        return "\n".join(lines).encode("utf-8")
    data = text.encode("utf-8")
    pos = rng.randrange(len(data) + 1)
    if op == 0:
        return data[:pos]
    if op == 1:
        return data[:pos] + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00", b"\x07", b"\x1b[2J"]) + data[pos:]
    if op == 2:
        return data[:pos] + rng.choice([b"[", b"{", b"]", b"}", b"'", b'"', b":", b"- ", b"&a ", b"*a", b"!!python/object:os.system ", b"\t"]) + data[pos:]
    if op == 3:
        return b"\xef\xbb\xbf" + data  # a byte-order mark
    if op == 4:
        return data.replace(b"\n", b"\r\n")
    return data + b"\n" + rng.choice([b"...\n", b"---\nmore: 1\n", b"%YAML 1.1\n", b"key: [unclosed\n"])


def crafted(rng: random.Random) -> list[bytes]:
    """Attacks written by hand: each is a whole file."""
    depth = rng.choice([200, 500, 5000])
    width = rng.choice([5, 10])
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 12):
        laughs.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    frames = rng.choice([10_000_000, 1_000_000_000, 10 ** 30])
    return [c.encode() if isinstance(c, str) else c for c in [
        "prompt: &p [*p]\n",
        "a: &a\n  b: *a\nprompt: x\n",
        "sweep: &s {seed: *s}\n",
        "\n".join(laughs) + "\nprompt: x\nsweep: {prompt: *a11}\n",
        "sweep:\n  seed: " + "[" * depth + "1" + "]" * depth + "\n",
        "prompt: x\nnested: " + "{a: " * depth + "1" + "}" * depth + "\n",
        "- " * depth + "x\n",
        f"animation:\n  keyframes:\n    0: {{prompt: a}}\n    {frames}: {{prompt: b}}\n",
        "animation:\n  keyframes: {0: {prompt: a}, 10: {prompt: b}}\n  schedules: {guidance: \"0:(((9**999)**999)**999)\"}\n",
        "animation:\n  keyframes: {0: {prompt: a}, 10: {prompt: b}}\n  schedules: {steps: \""
        + ", ".join(f"{i}:({i % 50 + 1})" for i in range(20_000)) + "\"}\n",
        "prompt: \"" + "{a|b|c|d}" * 10 + "\"\n",
        "prompt: \"{" + "|".join(str(i) for i in range(20_000)) + "}\"\n",
        "outputs: {png: {}}\n", "conditioners: {text: {}}\n", "outputs: [{}]\n", "outputs: [[]]\n",
        "outputs: [{ｐｎｇ: {}}]\n", "outputs: [{png: 5}]\n", "outputs: [{png: {path: \"{id:.0}../escape-{id}.png\"}}]\n",
        "name: ../../../x\n", "name: \"a/b\"\n", "model: \"" + "m" * 5000 + "\"\n", "wildcards: \"" + "w" * 5000 + "\"\n",
        "guidance: .nan\n", "guidance: .inf\n", "animation: {fps: .nan, keyframes: {0: {prompt: a}}}\n",
        "edit:\n  source: {prompt: a, seed: 1}\n  directions: [{kind: prompt-difference, pairs: [[]]}]\n",
        "edit:\n  source: {prompt: a, seed: 1}\n  directions: [{kind: prompt-difference, to: b}]\n  strengths: {from: 0, to: 1, steps: .nan}\n",
        "prompt: \"a __../x__\"\nprompt_sampling: random\n", "prompt: \"a __../x__\"\n",
        "prompt: \"\x07bell\"\n".encode("utf-8"), b"prompt: \"\xff\xfe\"\n", b"prompt: x\n\x00\n",
        "sweep: {seed: {start: 0, count: 1000000000000000}}\n",
        "sweep: {seed: {start: 0, count: 4000000000}, steps: [" + ", ".join(map(str, range(1, 1001)))
        + "], negative_prompt: [" + ", ".join(f"n{i}" for i in range(5000)) + "]}\n",
        "sweep: {seed: [" + ", ".join(str(i) for i in range(5000)) + "], steps: [" + ", ".join("1" for _ in range(5000)) + "]}\n",
        "conditioners:\n  - text\n  - img2img: {image: /dev/zero}\n", "conditioners:\n  - text\n  - img2img: {image: /dev/urandom}\n",
        "animation: {keyframes: {0: {prompt: a}, 12: {prompt: b}}}\noutputs: [frames, {video: {audio: /etc/passwd}}]\n",
        "model: /etc/passwd\n", "model: /dev/zero\n",
    ]]


def generate(count: int, seed: int) -> list[tuple[str, bytes]]:
    """``count`` cases (name, file bytes): crafted ones first, then mutations of the example jobs."""
    rng = random.Random(seed)
    cases = [(f"crafted-{i:03d}", body) for i, body in enumerate(crafted(rng))][:count]
    examples = sorted(JOBS.glob("*.yaml"))
    bases = [(p.stem, yaml.safe_load(p.read_text())) for p in examples]
    donors = [_restore_int_keys(json.loads(json.dumps(b)), b) for _, b in bases]
    while len(cases) < count:
        stem, base = rng.choice(bases)
        data = json.loads(json.dumps(base))  # a deep copy with string keys (keyframe numbers stay valid)
        data = _restore_int_keys(data, base)
        for _ in range(rng.choice([1, 1, 2, 3, 6])):
            data = mutate_tree(data, rng, donors)
        try:
            text = yaml.safe_dump(data, allow_unicode=rng.random() < 0.5, sort_keys=False, width=rng.choice([80, 10 ** 6]))
        except (yaml.YAMLError, RecursionError):
            continue
        body = mutate_text(text, rng) if rng.random() < 0.25 else text.encode("utf-8")
        cases.append((f"{stem}-{len(cases):05d}", body))
    return cases


def _restore_int_keys(copy, original):
    """json.dumps turned int keys (animation frames) into text; put the originals back."""
    if isinstance(original, dict):
        return {k: _restore_int_keys(copy[str(k)], v) for k, v in original.items()}
    if isinstance(original, list):
        return [_restore_int_keys(c, o) for c, o in zip(copy, original)]
    return original


# ---------------------------------------------------------------- worker
def worker(folder: Path, names: list[str]) -> None:
    """Validate each file in-process and print one JSON line per file."""
    import contextlib
    import io
    import resource
    import traceback

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    code = os.environ.get("SDBATCH_FUZZ_CODE")  # another checkout's sdbatch, for figures before a change
    if code:
        sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path.insert(0, code)
    from sdbatch.cli import main

    for name in names:
        print(json.dumps({"start": name}), flush=True)
        err, out = io.StringIO(), io.StringIO()
        began = time.monotonic()
        error = None
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(["validate", str(folder / name)])
                count = re.search(r": ok, (\d+) items", out.getvalue())
                if code == 0 and count:  # a valid job must also plan its first and last items
                    last = max(0, int(count.group(1)) - 1)
                    code = main(["plan", str(folder / name), "--limit", "2"]) or \
                        main(["plan", str(folder / name), "--offset", str(last), "--limit", "1"])
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - the finding
            code, error = None, traceback.format_exc(limit=-3)
        print(json.dumps({"name": name, "code": code, "stderr": err.getvalue()[:1_000_000], "traceback": error,
                          "seconds": time.monotonic() - began}), flush=True)


# ---------------------------------------------------------------- parent
def run_cases(cases: list[tuple[str, bytes]], folder: Path, timeout: float = SECONDS_PER_FILE) -> list[dict]:
    """Write the cases beside copies of the example jobs (their inputs resolve) and validate each."""
    shutil.copytree(JOBS, folder, dirs_exist_ok=True)
    names = []
    for name, body in cases:
        (folder / f"{name}.yaml").write_bytes(body)
        names.append(f"{name}.yaml")
    results, pending = [], list(names)
    while pending:
        results += _run_worker(folder, pending, timeout)
        done = {r["name"] for r in results}
        pending = [n for n in pending if n not in done]
    return results


def _run_worker(folder: Path, names: list[str], timeout: float) -> list[dict]:
    """Results until the worker ends or passes the limit on one file (then that file is a hang)."""
    list_file = folder / ".fuzz-names.json"
    list_file.write_text(json.dumps(names))
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(folder), str(list_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    results, current, deadline = [], None, time.monotonic() + 120  # the first case also loads the plugins
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            proc.wait()
            if current is not None:
                results.append({"name": current, "code": None, "hang": True, "stderr": "", "traceback": None,
                                "seconds": timeout})
            return results
        if line is None:
            proc.wait()
            if current is not None:  # the worker died on this file (memory limit, a crash in C)
                results.append({"name": current, "code": None, "stderr": "", "seconds": 0.0,
                                "traceback": f"worker died with code {proc.returncode}"})
            return results
        record = json.loads(line)
        if "start" in record:
            current, deadline = record["start"], time.monotonic() + timeout
        else:
            results.append(record)
            current, deadline = None, time.monotonic() + timeout


PROBLEM_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>\S.*?): \S")


def findings(result: dict, folder: Path) -> list[str]:
    """What is wrong with one file's outcome (an empty list when it behaved)."""
    name = result["name"]
    if result.get("hang"):
        return [f"{name}: hang (over {SECONDS_PER_FILE:g} s)"]
    if result["traceback"]:
        return [f"{name}: traceback\n{result['traceback']}"]
    if result["code"] not in (0, 2):
        return [f"{name}: exit code {result['code']}\n{result['stderr'][-2000:]}"]
    found = []
    if result["code"] == 2:
        rows = result["stderr"].splitlines()
        header = f"{folder / name}: "
        problems = [row for row in rows if not (row.startswith(header) and "problem" in row and "found" in row)]
        if not problems:
            found.append(f"{name}: exit 2 without a problem line")
        for row in problems:
            if row.startswith("sdbatch: warning:"):
                continue
            if not PROBLEM_LINE.match(row) or not row.startswith(str(folder / name) + ":"):
                found.append(f"{name}: message without file:line:column and key path: {row[:300]!r}")
            elif len(row) > MAX_LINE:
                found.append(f"{name}: message of {len(row)} characters: {row[:200]!r}...")
    return found


def summarise(results: list[dict], folder: Path) -> dict:
    figures = {"files": len(results), "ok": 0, "invalid": 0, "tracebacks": 0, "hangs": 0, "bad_exit": 0,
               "messages_without_line": 0, "long_messages": 0, "slowest_s": 0.0}  # messages: files with one
    for result in results:
        figures["slowest_s"] = max(figures["slowest_s"], round(result.get("seconds", 0.0), 2))
        if result.get("hang"):
            figures["hangs"] += 1
        elif result["traceback"]:
            figures["tracebacks"] += 1
        elif result["code"] not in (0, 2):
            figures["bad_exit"] += 1
        else:
            figures["ok" if result["code"] == 0 else "invalid"] += 1
            found = findings(result, folder)  # counted per file: one bad message can span many lines
            figures["long_messages"] += any("characters:" in f for f in found)
            figures["messages_without_line"] += any("characters:" not in f for f in found)
    return figures


# ---------------------------------------------------------------- the test
def test_hostile_job_files(tmp_path):
    count = int(os.environ.get("SDBATCH_FUZZ_CASES", CI_CASES))
    seed = int(os.environ.get("SDBATCH_FUZZ_SEED", 20))
    results = run_cases(generate(count, seed), tmp_path)
    problems = [f for r in results for f in findings(r, tmp_path)]
    assert len(results) == count
    assert sum(r["code"] == 0 for r in results) > count // 20, "mutations should leave some jobs valid"
    assert not problems, f"{len(problems)} findings, the first:\n" + "\n".join(problems[:5])


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--folder", default=None, help="where to write the cases (default: a temporary folder)")
    parser.add_argument("--show", type=int, default=10, help="print this many findings")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), json.loads(Path(args.worker[1]).read_text()))
        return
    import tempfile

    folder = Path(args.folder or tempfile.mkdtemp(prefix="sdbatch-fuzz-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = run_cases(generate(args.cases, args.seed), folder)
    for finding in [f for r in results for f in findings(r, folder)][:args.show]:
        print(finding[:1500], "\n")
    (folder / "results.json").write_text(json.dumps(results))
    print("slowest:", ", ".join(f"{r['name']} {r['seconds']:.2f}s" for r in sorted(
        results, key=lambda r: -r["seconds"])[:5]))
    print(json.dumps(summarise(results, folder), indent=1))


if __name__ == "__main__":
    _cli()
