"""What every comparison shares: paths, environments, interleaved timing, temporary homes.

Timings on a shared, noisy machine are only meaningful as ratios measured in the same run, with
the two sides interleaved (A, B, A, B, ...), summarised by medians.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
VENV_BIN = Path(sys.executable).parent
OPTJOB = str(VENV_BIN / "optjob")
SKY = str(VENV_BIN / "sky")
PYTHON = sys.executable
CATALOG_V8 = (REPO / "tests" / "data" / "skypilot-catalog" / "v8").resolve()
#: Cache of the built-in corpus, tokenizers and tokenized data, shared by every comparison (and
#: kept between suite runs) so no comparison pays for building it inside a timed region.
CACHE = Path(os.environ.get("OPTJOB_BENCH_CACHE") or Path.home() / ".cache" / "optjob-bench").expanduser()
#: Any HTTP(S) request from a SkyPilot process fails at once: the comparisons run offline.
#: The internet through a dead proxy; loopback direct (SkyPilot 0.14's CLI talks to its own API
#: server on 127.0.0.1: through the proxy it waits a minute and says the server failed to start).
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}


@dataclass
class Ctx:
    """What ``run`` gets: the mode and a scratch folder removed after the suite."""

    quick: bool
    tmp: Path
    options: dict[str, Any] = field(default_factory=dict)

    def mkdtemp(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def base_env(**extra: str) -> dict[str, str]:
    """This environment with optjob pointed away from the user's state; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTJOB_")}
    env.update({"OPTJOB_CACHE": str(CACHE), "PYTHONWARNINGS": "ignore", "NO_COLOR": "1",
                "TERM": "dumb", "COLUMNS": "120"})
    env.update(extra)
    return env


def run_cmd(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path = REPO, check: bool | tuple[int, ...] = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``args``; (wall seconds, completed process with ``cpu_s`` set). ``check`` raises on an unexpected exit
    code (0, or any code listed in ``check`` when it is a tuple)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the process and every descendant it waited for: far less sensitive than wall
    # time to other people's work on the same cores.
    proc.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # type: ignore[attr-defined]
    ok = check if isinstance(check, tuple) else (0,) if check else None
    if ok is not None and proc.returncode not in ok:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
        raise RuntimeError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{tail}")
    return wall, proc


def interleave(sides: Mapping[str, Callable[[], float | None]], rounds: int,
               warmup: int = 0) -> dict[str, list[float]]:
    """Call each side once per round, in turn (A, B, A, B, ...); each call returns its own
    measurement (or None to be timed here). ``warmup`` rounds are run and dropped."""
    out: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(warmup + rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            value = fn()
            took = time.perf_counter() - t if value is None else float(value)
            if r >= warmup:
                out[name].append(took)
    return out


def pair_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[i] / b[i] for each interleaved round."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


def write_spec(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def small_spec(name: str, *, steps: int, hourly_usd: float | None = 0.1, max_usd: float = 1.0,
               max_hours: float = 1.0, layers: int = 2, hidden: int = 128, seq_len: int = 64,
               eval_batches: int = 20, checkpoint_every: int = 100) -> str:
    """The small CPU spec the manager comparisons run: a 2-layer 128-wide Llama on the built-in
    corpus (600k characters), train then evaluate."""
    hourly = "null" if hourly_usd is None else repr(hourly_usd)
    return f"""\
name: {name}
model:
  init: {{family: llama, layers: {layers}, hidden: {hidden}, heads: 4, intermediate: {3 * hidden}, vocab: 2048}}
data:
  source: builtin:python-docs
  seq_len: {seq_len}
  max_chars: 600000
steps:
  - train: {{max_steps: {steps}, lr: 1.0e-3, batch_size: 8, warmup_steps: 10, seed: 0,
             checkpoint_every: {checkpoint_every}}}
  - evaluate: {{metrics: [perplexity, accuracy, latency, size], max_batches: {eval_batches}}}
resources: {{cloud: local, hourly_usd: {hourly}}}
budget: {{max_usd: {max_usd}, max_hours: {max_hours}}}
"""


_WARMED: set[str] = set()


def warm_cache(spec_path: Path) -> None:
    """Build (once) the corpus, tokenizer and token ids ``spec_path`` needs, in ``CACHE``, so that
    no timed run pays for them. Runs in a child process: the caller stays free of torch. Specs
    with the same data and tokenizer share one warm-up per suite run."""
    import yaml

    raw = yaml.safe_load(spec_path.read_text())
    key = json.dumps([raw.get("data"), raw["model"].get("tokenizer"), (raw["model"].get("init") or {}).get("vocab")],
                     sort_keys=True)
    # A marker per (data, tokenizer, cache code) says an earlier suite run built them: then no child
    # process (it would import torch only to find everything cached).
    code_hash = hashlib.sha256(b"".join((REPO / "steps" / f).read_bytes() for f in ("data.py", "tokenizer.py")))
    marker = CACHE / "warm" / hashlib.sha256(key.encode() + code_hash.digest()).hexdigest()[:24]
    if key in _WARMED or marker.exists():
        return
    code = ("import sys; from pathlib import Path; from optjob.specs import load_spec; "
            "from optjob.steps.data import load_text, build_corpus; "
            "from optjob.steps.tokenizer import load_tokenizer; "
            "spec = load_spec(sys.argv[1]); cache = Path(sys.argv[2]); text = load_text(spec.data, cache); "
            "tok = load_tokenizer(spec, text, cache); build_corpus(spec, tok, cache, dry_run=False, text=text)")
    run_cmd([PYTHON, "-c", code, str(spec_path), str(CACHE)], env=base_env(), timeout=900)
    _WARMED.add(key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)


@contextmanager
def sky_home(parent: Path) -> Iterator[Path | None]:
    """A temporary home whose ``~/.sky/catalogs/v8`` is a copy of the SkyPilot catalog subset the repository carries
    (None when this checkout lacks ``tests/data/skypilot-catalog/v8``). A copied catalog has no
    ``.meta/*.md5``, which SkyPilot reads as "edited by hand": it never re-downloads it."""
    if not (CATALOG_V8 / "aws" / "vms.csv").is_file():
        yield None
        return
    home = Path(tempfile.mkdtemp(prefix="skyhome-", dir=parent))
    (home / ".sky" / "catalogs").mkdir(parents=True)
    shutil.copytree(CATALOG_V8, home / ".sky" / "catalogs" / "v8")
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def sky_env(home: Path) -> dict[str, str]:
    return base_env(HOME=str(home), **OFFLINE)


def last_json(text: str) -> Any:
    """The last line of ``text`` that parses as a JSON object (skips SkyPilot's payload lines)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError(f"no JSON object in output: {text[-500:]!r}")


def fmt_s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"
