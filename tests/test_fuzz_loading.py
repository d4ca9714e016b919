"""Fuzzing load_model: a few hundred seeded mutations of a complete checkpoint directory.

The bundled tiny model (config.json, model.safetensors, linear_spec_lora/, tokenizer.json,
tokenizer_config.json, chat_template.jinja) and its nld-convert Orbax copy are mutated one file
at a time: safetensors headers (as JSON, and the length field), safetensors bodies (truncated,
extended, bytes flipped), config.json, adapter_config.json, the tokenizer files and the Orbax
marker (as JSON values, and as bytes). Each case is loaded in a worker process
(tests/fuzz_loading_worker.py) so that a hang or an interpreter crash is seen as such. Every
case must end as one of:

- loaded, equal to the original;
- loaded completely, differing only where the mutation made a still-valid checkpoint (say
  rms_norm_eps changed, or a weight's bytes flipped: safetensors has no checksum);
- a named error: LoadError, ConfigError or TokenizerError (the tokenizer is also used:
  encode, chat template).

Never another exception, a hang, a crash or a partial model. `RELIABILITY.md` has the counts.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import pathlib
import selectors
import struct
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from nld_jax import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("fuzz_loading_worker.py")
SEED = 20261206
CASE_SECONDS = 60  # one load of the tiny model takes ~0.1 s: anything near this is a hang
# Values that are wrong in type, sign, size or finiteness for most fields.
JUNK = [None, True, False, -1, 0, 1, 3, 2**70, -2**31, 0.5, -0.0, 1e308, float("nan"),
        float("inf"), "", "x", "bfloat16", "F64", [], {}, [1, 2], {"a": 1}, [[0]]]


@dataclasses.dataclass
class Case:
    kind: str  # the class of mutation (the row of the reliability table)
    what: str  # the mutation, for failure messages
    files: dict[str, bytes | None]  # relative path -> new content (None: file deleted)


def _json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (the root excluded)."""
    paths = []
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        paths.append((*prefix, key))
        paths += _json_paths(child, (*prefix, key))
    return paths


def _mutate_json(doc: object, rng: np.random.Generator) -> tuple[object, str]:
    """One random change: a value replaced by junk, a key deleted or added, a list shortened."""
    doc = copy.deepcopy(doc)
    paths = _json_paths(doc)
    path = paths[rng.integers(len(paths))]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = rng.integers(4)
    if action == 0 or not isinstance(parent, dict | list):
        value = JUNK[rng.integers(len(JUNK))]
        parent[path[-1]] = value
        return doc, f"{list(path)} = {value!r}"
    if action == 1:
        del parent[path[-1]]
        return doc, f"del {list(path)}"
    if action == 2 and isinstance(parent, dict):
        parent[f"unknown_{int(rng.integers(100))}"] = JUNK[rng.integers(len(JUNK))]
        return doc, f"new key beside {list(path)}"
    old = parent[path[-1]]
    if isinstance(old, int | float) and not isinstance(old, bool):
        new = old * [-1, 0, 2, 1000][rng.integers(4)] + int(rng.integers(-1, 2))
        parent[path[-1]] = new
        return doc, f"{list(path)}: {old!r} -> {new!r}"
    parent[path[-1]] = JUNK[rng.integers(len(JUNK))]
    return doc, f"{list(path)} = junk"


def _mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes | None, str]:
    """Truncated, a byte flipped, bytes inserted, emptied, not UTF-8, or the file deleted."""
    action = rng.integers(6)
    at = int(rng.integers(len(data)))
    if action == 0:
        return data[:at], f"truncated at {at}"
    if action == 1:
        flipped = bytes([data[at] ^ int(rng.integers(1, 256))])
        return data[:at] + flipped + data[at + 1:], f"byte {at} flipped"
    if action == 2:
        junk = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        return data[:at] + junk + data[at:], f"{len(junk)} bytes inserted at {at}"
    if action == 3:
        return b"", "emptied"
    if action == 4:
        return b"\xff\xfe" + data, "not UTF-8"
    return None, "deleted"


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _header_case(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    header, body = _split_safetensors(data)
    header, what = _mutate_json(header, rng)
    return _join_safetensors(header, body), what


def _length_case(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    (length,) = struct.unpack("<Q", data[:8])
    new = [0, 1, length - 1, length + 1, length + 8, len(data), 2**63, 2**64 - 1,
           int(rng.integers(2**40))][rng.integers(9)]
    return struct.pack("<Q", new) + data[8:], f"header length {length} -> {new}"


def _body_case(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    header, body = _split_safetensors(data)
    start = len(data) - len(body)
    action = rng.integers(3)
    if action == 0:
        cut = start + int(rng.integers(len(body)))
        return data[:cut], f"truncated in the data at {cut}"
    if action == 1:
        junk = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        return data + junk, f"{len(junk)} bytes appended"
    at = start + int(rng.integers(len(body)))
    return (data[:at] + bytes([data[at] ^ int(rng.integers(1, 256))]) + data[at + 1:],
            f"weight byte {at} flipped")


def _json_case(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    doc, what = _mutate_json(json.loads(data), rng)
    return json.dumps(doc).encode(), what


def _bytes_case(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes | None, str]:
    return _mutate_bytes(data, rng)


def _template_case(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    pieces = ["{% if %}", "{{", "{% for m in messages %}", "{{ messages[0].content.upper() }}",
              "{{ raise_exception('no') }}", "{{ ''.__class__ }}", "{% endfor %}",
              "{{ messages[5].content }}", "{{ 1 / 0 }}", "plain text", "{{ x.y.z }}"]
    chosen = [pieces[i] for i in rng.integers(len(pieces), size=int(rng.integers(1, 4)))]
    return "".join(chosen).encode(), f"template {''.join(chosen)!r}"


# (class name, file, mutator, cases): about 300 in all.
PLAN: list[tuple[str, str, Callable, int]] = [
    ("safetensors header (JSON values)", "model.safetensors", _header_case, 60),
    ("safetensors header length field", "model.safetensors", _length_case, 12),
    ("safetensors body (truncated, extended, weight bytes flipped)", "model.safetensors",
     _body_case, 36),
    ("adapter safetensors header", "linear_spec_lora/adapter_model.safetensors", _header_case,
     15),
    ("adapter safetensors body", "linear_spec_lora/adapter_model.safetensors", _body_case, 10),
    ("adapter_config.json (JSON values)", "linear_spec_lora/adapter_config.json", _json_case,
     15),
    ("config.json (JSON values)", "config.json", _json_case, 100),
    ("config.json (bytes)", "config.json", _bytes_case, 12),
    ("tokenizer.json (JSON values)", "tokenizer.json", _json_case, 25),
    ("tokenizer.json (bytes)", "tokenizer.json", _bytes_case, 10),
    ("tokenizer_config.json (JSON values)", "tokenizer_config.json", _json_case, 25),
    ("tokenizer_config.json (bytes)", "tokenizer_config.json", _bytes_case, 5),
    ("chat_template.jinja", "chat_template.jinja", _template_case, 10),
    ("Orbax marker nld_orbax.json (JSON values)", "orbax:nld_orbax.json", _json_case, 15),
    ("Orbax marker nld_orbax.json (bytes)", "orbax:nld_orbax.json", _bytes_case, 5),
]


def _cases(sources: dict[str, pathlib.Path]) -> list[Case]:
    rng = np.random.default_rng(SEED)
    cases = []
    for kind, target, mutate, count in PLAN:
        source = "orbax" if target.startswith("orbax:") else "hf"
        name = target.removeprefix("orbax:")
        data = (sources[source] / name).read_bytes()
        for _ in range(count):
            content, what = mutate(name, data, rng)
            cases.append(Case(kind, f"{target}: {what}", {f"{source}:{name}": content}))
    return cases


def _materialise(case: Case, sources: dict[str, pathlib.Path], where: pathlib.Path) -> str:
    """The case's directory: its mutated file written, every other file a symlink."""
    ((key, content),) = case.files.items()
    source, name = key.split(":", 1)
    root = sources[source]
    for path in root.rglob("*"):
        target = where / path.relative_to(root)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif str(path.relative_to(root)) != name:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    if content is not None:
        (where / name).write_bytes(content)
    return str(where)


class _Worker:
    """tests/fuzz_loading_worker.py, restarted after a hang or a crash."""

    def __init__(self, original: pathlib.Path):
        self.original = original
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, str(WORKER), str(self.original)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env,
                                        cwd=ROOT)
        assert self._answer(120) == {"outcome": "ready"}

    def _answer(self, seconds: float) -> dict | None:
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        ready = selector.select(seconds)
        selector.close()
        line = self.process.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def run(self, path: str) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(path + "\n")
        self.process.stdin.flush()
        answer = self._answer(CASE_SECONDS)
        if answer is None:
            hung = self.process.poll() is None
            self.close()
            return {"outcome": "hang" if hung else "crash"}
        return answer

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def run_fuzz(tmp_path: pathlib.Path) -> list[tuple[Case, dict]]:
    """Every case of PLAN loaded in the worker: [(case, answer)]."""
    from convert import hf_to_orbax

    orbax = tmp_path / "orbax"
    hf_to_orbax.convert(tiny.TINY_MODEL_DIR, orbax, progress=False)
    sources = {"hf": tiny.TINY_MODEL_DIR, "orbax": orbax}
    worker = _Worker(tiny.TINY_MODEL_DIR)
    results = []
    try:
        for i, case in enumerate(_cases(sources)):
            path = _materialise(case, sources, tmp_path / f"case{i:03d}")
            results.append((case, worker.run(path)))
    finally:
        worker.close()
    return results


def reliability_table(results: list[tuple[Case, dict]]) -> str:
    """Markdown rows: class, cases, and how many ended each way."""
    rows = collections.defaultdict(collections.Counter)
    for case, answer in results:
        outcome = answer["outcome"]
        rows[case.kind][answer.get("error", outcome) if outcome == "named" else outcome] += 1
    lines = []
    for kind, counts in rows.items():
        ends = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        lines.append(f"| {kind} | {sum(counts.values())} | {ends} |")
    return "\n".join(lines)


@pytest.mark.slow
def test_mutated_checkpoints_load_equal_or_fail_with_a_named_error(tmp_path):
    results = run_fuzz(tmp_path)
    print("\n" + reliability_table(results))
    assert len(results) == sum(count for *_, count in PLAN) >= 300
    bad = [(case.what, answer) for case, answer in results
           if answer["outcome"] not in ("equal", "variant", "named")]
    assert not bad, f"{len(bad)} case(s) ended otherwise:\n" + "\n".join(map(str, bad[:10]))
    for case, answer in results:
        # No way to read a checkpoint whose header length or tensor data is cut short.
        if any(word in case.what for word in ("header length", "truncated in the data")):
            assert answer["outcome"] == "named", (case.what, answer)
        # A flipped weight byte changes that one tensor at most (or makes it NaN/Inf: named).
        if "weight byte" in case.what and answer["outcome"] == "variant":
            assert len(answer["differs"]) == 1, (case.what, answer)
    outcomes = collections.Counter(answer["outcome"] for _, answer in results)
    assert outcomes["named"] >= len(results) // 2, outcomes  # the fuzz reaches the checks


if __name__ == "__main__":  # prints the table for RELIABILITY.md
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        print(reliability_table(run_fuzz(pathlib.Path(directory))))
